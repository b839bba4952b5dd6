"""Lift parameters and module buffers from graph inputs to constants of the GraphModule.

Dynamo passes every parameter as a placeholder whose ``meta["grapharg"].source`` names it
(``L['self']._modules['model']...._parameters['weight']``). Turning each into a ``get_attr``
of a registered buffer lets the passes rewrite weights and lets Inductor's freezing fold
them. A buffer that the graph writes to in place stays an input: freezing it would be wrong.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

# Dynamo's sources name a parameter by the path it took from a local to the tensor. The
# attribute hops that belong to the module tree: ``._modules['x']``, ``._parameters['w']``,
# ``._buffers['b']`` (or a plain ``.x`` on a module); everything above the first module (the
# root local, ``L['self']`` or ``L['args'][0]`` when transformers wraps ``forward``) is dropped.
_TREE_DICTS = ("_modules", "_parameters", "_buffers")


def source_name(source) -> str:
    name = source.name
    return name() if callable(name) else name


def fqn_of_source(source) -> str | None:
    """``model.layers.0.self_attn.q_proj.weight`` for a parameter or buffer source, else None.

    Resolved by walking the source chain (``DictGetItemSource`` on ``_parameters`` and so on),
    not by parsing its printed name, so the root's spelling does not matter.
    """
    parts: list[str] = []
    leaf_kind = None
    while source is not None:
        base = getattr(source, "base", None)
        member = getattr(base, "member", None)
        if member in _TREE_DICTS and hasattr(source, "index"):
            parts.append(str(source.index))
            leaf_kind = leaf_kind or member
            source = getattr(base, "base", None)
            continue
        if member is None and hasattr(source, "member") and not source.member.startswith("_") \
                and parts and _is_module_source(base):
            parts.append(source.member)  # a module reached by plain attribute access
        source = base
    if leaf_kind not in ("_parameters", "_buffers"):
        return None
    return ".".join(reversed(parts))


def _is_module_source(source) -> bool:
    guard = getattr(source, "guard_source", None)
    guard = guard() if callable(guard) else guard
    return guard is not None and "NN_MODULE" in getattr(guard, "name", "")


def _mutates(node: fx.Node) -> bool:
    """True if some user writes to ``node`` in place (``add_``, ``copy_``, ``x[i] = …``)."""
    for user in node.users:
        if user.op == "call_method" and user.target.endswith("_") and not user.target.endswith("__"):
            return True
        if user.op == "call_function":
            if user.target is operator.setitem:
                return True
            name = getattr(user.target, "__name__", "")
            if name.endswith("_") and not name.endswith("__"):
                return True
    return False


@dataclass
class LiftedConstants:
    """What lifting did: which example inputs remain and which constants replaced the rest."""

    kept_inputs: list[int]
    fqn_by_attr: dict[str, str] = field(default_factory=dict)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # attr -> the parameter itself
    left_as_inputs: dict[str, str] = field(default_factory=dict)  # fqn -> reason
    position_of: dict[str, int] = field(default_factory=dict)  # attr -> position among the call's arguments

    def runtime_inputs(self, args):
        return [args[i] for i in self.kept_inputs]


def attr_name(fqn: str) -> str:
    return "qfx__" + fqn.replace(".", "__")


def lift_parameters(gm: fx.GraphModule, example_inputs) -> LiftedConstants:
    """Replace parameter/buffer placeholders with ``get_attr`` constants, in place."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lifted = LiftedConstants(kept_inputs=[])
    for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
        grapharg = node.meta.get("grapharg")
        fqn = fqn_of_source(grapharg.source) if grapharg is not None and grapharg.source else None
        if fqn is None or not isinstance(value, torch.Tensor):
            lifted.kept_inputs.append(index)
            continue
        if _mutates(node):
            lifted.kept_inputs.append(index)
            lifted.left_as_inputs[fqn] = "written in place by the graph"
            continue
        name = attr_name(fqn)
        gm.register_buffer(name, value.detach())
        with gm.graph.inserting_before(node):
            constant = gm.graph.get_attr(name)
        constant.meta.update(node.meta)
        constant.meta["quarot_fqn"] = fqn
        node.replace_all_uses_with(constant)
        gm.graph.erase_node(node)
        if hasattr(gm, "_param_name_to_source"):
            gm._param_name_to_source[name] = grapharg.source
        lifted.fqn_by_attr[name] = fqn
        lifted.originals[name] = value
        lifted.position_of[name] = index
    gm.recompile()
    return lifted
