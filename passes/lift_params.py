"""Lift parameters and module buffers from graph inputs to constants of the GraphModule.

Dynamo passes every parameter as a placeholder whose ``meta["grapharg"].source`` names it
(``L['self']._modules['model']...._parameters['weight']``). Turning each into a ``get_attr``
of a registered buffer lets the passes rewrite weights and lets Inductor's freezing fold
them. A buffer that the graph writes to in place stays an input: freezing it would be wrong.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

_SOURCE_PART = re.compile(r"\._(modules|parameters|buffers)\['([^']+)'\]")


def source_name(source) -> str:
    name = source.name
    return name() if callable(name) else name


def fqn_of_source(source) -> str | None:
    """``model.layers.0.self_attn.q_proj.weight`` for a parameter or buffer source, else None."""
    parts = _SOURCE_PART.findall(source_name(source))
    if not parts or parts[-1][0] not in ("parameters", "buffers"):
        return None
    return ".".join(part for _, part in parts)


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
    gm.recompile()
    return lifted
