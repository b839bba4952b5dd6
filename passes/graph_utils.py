"""Small vocabulary over Dynamo FX graphs: op names, shapes, constants, weight-bearing sites.

Everything here looks at what a node computes (its target and the shapes Dynamo recorded
in ``meta["example_value"]``), never at module names.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

# Ops that only read a tensor's metadata (dtype, shape, device): such uses never see values.
METADATA_METHODS = {"size", "dim", "new_empty", "new_zeros", "new_ones", "new_full", "new_tensor",
                    "get_device", "numel", "is_contiguous", "element_size"}
# Ops that keep every element and the last dimension as it is (the whole value moves unchanged).
CONVERSION_METHODS = {"to", "float", "half", "bfloat16", "double", "type", "type_as", "contiguous", "clone",
                      "detach"}
CACHE_STORE = "quarot_cache_store"  # node.meta key: a packed KV cache's own quantizer (passes/kv_cache.py)
CONVERSION_FUNCTIONS = {"_to_copy", "clone", "contiguous", "detach"}


def arg(node: fx.Node, position: int, name: str, default=None):
    """An argument given by position or by keyword (``default`` when absent)."""
    return node.args[position] if len(node.args) > position else node.kwargs.get(name, default)


def op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        if node.target is operator.getitem:
            return "getitem"
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def value(node: Any):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def size_hint(size):
    """A size as a plain int: a symbolic size's value in the call being compiled, read without
    adding a guard (``int()`` on a SymInt would specialize the graph to it)."""
    if isinstance(size, torch.SymInt):
        return int(size.node.hint) if size.node.hint is not None else None
    return size


def shape(node: Any) -> tuple[int, ...] | None:
    v = value(node)
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    return None


def last_dim(node: Any) -> int | None:
    s = shape(node)
    return s[-1] if s else None


def is_tensor(node: Any) -> bool:
    return isinstance(value(node), torch.Tensor)


def first_arg(node: fx.Node):
    return node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))


def is_metadata_use(user: fx.Node, node: fx.Node) -> bool:
    """True if ``user`` reads only the metadata of ``node`` (``x.size()``, ``y.type_as(x)``)."""
    name = op_name(user)
    if name in METADATA_METHODS or (name == "getattr" and user.args[0] is node):
        return True
    if name in ("type_as", "expand_as", "view_as", "reshape_as") and user.args[0] is not node:
        return True
    if name == "to" and user.args[0] is not node:  # x.to(other): other's dtype/device only
        return True
    return False


def keeps_last_dim(node: fx.Node, source: fx.Node) -> bool:
    """The op moves whole last-dim vectors around: output last dim is source's, unmixed."""
    name = op_name(node)
    out, inp = shape(node), shape(source)
    if out is None or inp is None or not out or not inp or out[-1] != inp[-1]:
        return False
    if name in CONVERSION_METHODS or name in CONVERSION_FUNCTIONS:
        return first_arg(node) is source
    if name == "dropout":
        training = arg(node, 2, "training", True)
        return training is False
    if name in ("transpose",):
        dims = [d % len(inp) for d in node.args[1:3]]
        return len(inp) - 1 not in dims
    if name == "permute":
        perm = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return perm[-1] % len(inp) == len(inp) - 1
    if name in ("view", "reshape", "flatten", "unsqueeze", "squeeze", "expand", "repeat", "view_as",
                "reshape_as", "expand_as"):
        # A reshape may move elements across the last dim unless the trailing sizes agree and
        # the product of leading dims is preserved; both hold when the last dims are equal.
        if name == "repeat":
            reps = node.args[1:] if not isinstance(node.args[1], (list, tuple)) else node.args[1]
            return reps[-1] == 1
        return True
    if name == "getitem":
        return _index_keeps_last_dim(node.args[1], len(inp))
    return False


def origin(node: fx.Node) -> fx.Node:
    """Walk back through ops that move last-dim vectors unchanged (views, conversions) to
    the node that actually produced the values (an op, a placeholder or a constant)."""
    while node.op in ("call_function", "call_method"):
        src = node.args[0] if node.args else None
        if not (isinstance(src, fx.Node) and keeps_last_dim(node, src)):
            break
        node = src
    return node


def _index_keeps_last_dim(index, ndim: int) -> bool:
    """True if an index expression leaves the last dimension whole (only full slices there)."""
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index:
        after = index[index.index(Ellipsis) + 1:]
        return not after or _full_slice(after[-1])
    consumed = sum(1 for i in index if i is not None)
    if consumed < ndim:
        return True
    return _full_slice(index[-1])


def _full_slice(i) -> bool:
    return isinstance(i, slice) and i == slice(None, None, None)


def scalar_like(arg) -> bool:
    """A Python number, or a tensor that broadcasts over the last dimension (size 1 or 0-d)."""
    if isinstance(arg, (int, float)):
        return True
    s = shape(arg)
    return s is not None and (len(s) == 0 or s[-1] == 1)


def is_constant(gm: fx.GraphModule, node: Any) -> bool:
    """True if ``node`` depends only on lifted constants and literals."""
    if not isinstance(node, fx.Node):
        return True
    if node.op == "get_attr":
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    return all(is_constant(gm, a) for a in node.all_input_nodes)


def evaluate_constant(gm: fx.GraphModule, node: Any):
    """Compute a constant subexpression (e.g. Gemma's ``1 + w.float()``) from the lifted weights."""
    if not isinstance(node, fx.Node):
        return node
    if node.op == "get_attr":
        return getattr(gm, node.target)
    args = fx.node.map_arg(node.args, lambda n: evaluate_constant(gm, n))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: evaluate_constant(gm, n))
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def constant_signature(gm: fx.GraphModule, node: Any, fqn_of) -> str:
    """A stable description of a constant subexpression (for cache keys)."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "get_attr":
        tensor = getattr(gm, node.target)
        return f"{fqn_of(node.target)}@v{tensor._version}"
    inner = ",".join(constant_signature(gm, a, fqn_of) for a in node.args)
    return f"{op_name(node)}({inner})"


@dataclass
class Site:
    """A node that applies a constant weight matrix: linear, addmm (Conv1D) or embedding.

    ``logical`` weights are [out, in] for all three (addmm stores [in, out], embedding
    tables are [vocab, d] = [in, out]), so one set of edits serves every kind.
    """

    node: fx.Node
    kind: str  # "linear" | "addmm" | "embedding"

    @property
    def weight_node(self) -> fx.Node:
        return self.node.args[{"linear": 1, "addmm": 2, "embedding": 1}[self.kind]]

    @property
    def bias_node(self) -> fx.Node | None:
        if self.kind == "linear":
            return arg(self.node, 2, "bias")
        if self.kind == "addmm":
            return self.node.args[0]
        return None

    @property
    def input_node(self) -> fx.Node:
        return self.node.args[{"linear": 0, "addmm": 1, "embedding": 0}[self.kind]]

    @property
    def in_features(self) -> int:
        return self.to_logical(value(self.weight_node)).shape[1]

    @property
    def out_features(self) -> int:
        return self.to_logical(value(self.weight_node)).shape[0]

    def to_logical(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.kind == "linear" else weight.t()

    def from_logical(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight if self.kind == "linear" else weight.t()).contiguous()


def as_site(node: fx.Node) -> Site | None:
    """The weight-bearing site of a node, if its weight is a lifted constant."""
    if node.op != "call_function":
        return None
    name = op_name(node)
    kind = {"linear": "linear", "addmm": "addmm", "embedding": "embedding"}.get(name)
    if kind is None:
        return None
    site = Site(node, kind)
    weight = site.weight_node
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    if kind == "addmm" and (len(node.args) != 3 or node.kwargs):  # beta/alpha scaling not handled
        return None
    bias = site.bias_node
    if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr"):
        return None
    max_norm = arg(node, 3, "max_norm")
    if kind == "embedding" and max_norm is not None:
        return None  # max_norm renormalizes rows: not linear in the table
    return site


# Dynamo spells the compiled module's root as L['self'], or L['args'][0] when the model's
# forward is wrapped (transformers ≥ 5.24); nested modules as ".x" or "._modules['x']".
_DYNAMO_ROOT = re.compile(r"^L(?:\[[^\]]*\])+")
_MODULE_KEY = re.compile(r"\._modules\[['\"]([^'\"]+)['\"]\]")


def module_path(dynamo_path: str) -> str:
    """``model.layers.0.mlp`` from any spelling of a Dynamo module path ("" for the root)."""
    return _DYNAMO_ROOT.sub("", _MODULE_KEY.sub(r".\1", dynamo_path)).lstrip(".")


def label(node: fx.Node, default: str | None = None) -> str:
    """Where a node sits, for reports only (never for decisions): its innermost module's
    path relative to the compiled model, else ``default``, else the node's name."""
    stack = node.meta.get("nn_module_stack")
    path = module_path(list(stack.values())[-1][0]) if stack else ""
    return path or default or node.name
