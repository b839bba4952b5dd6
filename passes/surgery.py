"""Graph surgery on weight sites: point a site at new constants, or swap it for a quantized op.

The only code that registers weight buffers on the graph module and rewires linear/addmm/embedding
nodes; dead constants go with ``drop_unused_constants``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from quarot_fx.kernels.quantized_linear import simulated_linear

from .edits import SiteEdits


def _constant(gm: fx.GraphModule, before: fx.Node, name: str, tensor: torch.Tensor) -> fx.Node:
    """Register ``tensor`` as a buffer of gm and read it just before ``before``."""
    gm.register_buffer(name, tensor)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["example_value"] = tensor
    return node


def replace_site_weights(gm: fx.GraphModule, entry: SiteEdits, weight, bias) -> None:
    """Point the site's node at new constants (own buffers: tied weights become untied)."""
    node = entry.site.node
    prefix = f"qfx_edited__{node.name}"
    w_node = _constant(gm, node, prefix + "__weight", weight)
    args = list(node.args)
    kind = entry.site.kind
    args[{"linear": 1, "addmm": 2, "embedding": 1}[kind]] = w_node
    if bias is not None:
        b_node = _constant(gm, node, prefix + "__bias", bias)
        if kind == "addmm":
            args[0] = b_node
        elif len(args) > 2:
            args[2] = b_node
        elif "bias" in node.kwargs:
            node.kwargs = {**node.kwargs, "bias": b_node}
        else:
            args.append(b_node)
    node.args = tuple(args)


QUANTIZED_LINEAR = torch.ops.quarot_fx.quantized_linear.default
SPARSE_QUANTIZED_LINEAR = torch.ops.quarot_fx.sparse_quantized_linear.default
INTEGER_LINEARS = (QUANTIZED_LINEAR, SPARSE_QUANTIZED_LINEAR)


def integer_linear_shape(node: fx.Node) -> tuple[int, int, int]:
    """(in_features, out_features, groups) of a ``quantized_linear`` / ``sparse_quantized_linear`` node."""
    scale = node.args[3] if node.target is QUANTIZED_LINEAR else node.args[4]
    in_features = node.args[5] if node.target is QUANTIZED_LINEAR else node.args[6]
    out_features, groups = scale.meta["example_value"].shape
    return in_features, out_features, groups


def _swap_site(gm: fx.GraphModule, entry: SiteEdits, prefix: str, tensors: dict, target, args) -> fx.Node:
    """Replace a linear/addmm site by ``target(input, None, *constants, *args(out_dtype))``, the
    constants being ``tensors`` (None stays None); the None is the activation scale the lowering
    fills in when it hands the call integer codes."""
    node = entry.site.node
    constants = [_constant(gm, node, f"{prefix}__{node.name}__{name}", t) if t is not None else None
                 for name, t in tensors.items()]
    out = node.meta.get("example_value")
    dtype = out.dtype if isinstance(out, torch.Tensor) else entry.site.weight_node.meta["example_value"].dtype
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, (entry.site.input_node, None, *constants, *args(dtype)))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def replace_with_quantized_linear(gm: fx.GraphModule, entry: SiteEdits, weights: dict, scales, bias,
                                  in_features: int, extra: tuple = (), gemm: str = "auto",
                                  keep_unpacked: bool = False) -> fx.Node:
    """Swap a linear/addmm site for ``quantized_linear`` (``weights`` = {"weight": packed}) or
    ``sparse_quantized_linear`` ({"values": …, "meta": …}, ``extra`` = (format, kept)) on
    constants (float input for now: the lowering then hands it integer codes)."""
    target = QUANTIZED_LINEAR if "weight" in weights else SPARSE_QUANTIZED_LINEAR
    return _swap_site(gm, entry, "qfx_packed", {**weights, "scale": scales, "bias": bias}, target,
                      lambda dtype: (in_features, dtype, *extra, gemm, keep_unpacked))


def replace_with_simulated_linear(gm: fx.GraphModule, entry: SiteEdits, codes, scales, bias) -> fx.Node:
    """Swap a linear/addmm site for ``simulated_linear`` on float weight codes and scales (float
    input for now: the fake lowering then hands it the activation codes)."""
    return _swap_site(gm, entry, "qfx_codes", {"weight": codes, "scale": scales, "bias": bias}, simulated_linear,
                      lambda dtype: (dtype,))


def side_effects(node: fx.Node) -> bool:
    """FX's purity test plus in-place methods (``buf.add_(1)``), which it does not know."""
    if node.is_impure():
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def drop_unused_constants(gm: fx.GraphModule) -> None:
    """Remove get_attr nodes and buffers nothing uses any more (the pre-edit weights)."""
    gm.graph.eliminate_dead_code(is_impure_node=side_effects)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [name for name, _ in gm.named_buffers(recurse=False) if name not in used]:
        delattr(gm, name)


INT8_WEIGHT_LINEAR = torch.ops.quarot_fx.int8_weight_linear.default
INT8_DYNAMIC_LINEAR = torch.ops.quarot_fx.int8_dynamic_linear.default


def replace_with_int8_linear(gm: fx.GraphModule, node: fx.Node, x: fx.Node, codes, scale, bias,
                             op=INT8_WEIGHT_LINEAR) -> fx.Node:
    """Swap a linear node for ``op(x, codes, scale, bias)`` on new constants (``int8_weight_linear``,
    or ``int8_dynamic_linear``: the same arguments)."""
    constants = [_constant(gm, node, f"qfx_int8__{node.name}__{name}", t) if t is not None else None
                 for name, t in (("weight", codes), ("scale", scale), ("bias", bias))]
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(op, (x, *constants))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new
