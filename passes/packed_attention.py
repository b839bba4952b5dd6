"""Attention straight from the packed KV cache.

After ``close_packed_cache`` a layer's attention reads ``kv_dequantize`` of the whole stored
cache, keys and values each: a float copy of the layer's cache, made every decode step only to
be read once. This pass rewrites ``scaled_dot_product_attention(q, kv_dequantize(K),
kv_dequantize(V), …)`` into ``quarot_fx::packed_attention(q, K…, V…, …)``, whose CPU kernel
dequantizes one block of tokens at a time inside attention (``kernels/packed_attention.py``).
Only where the dequantized cache has no other reader and every SDPA argument but the tensors is a
constant with dropout 0; anything else stays as it was, and the report says why.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from quarot_fx.kernels.kv_quant import KV_DEQUANTIZE
from quarot_fx.report import Skip

from .graph_utils import label, op_name

PACKED_ATTENTION = torch.ops.quarot_fx.packed_attention.default
SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _sdpa_arguments(node: fx.Node) -> dict | None:
    """SDPA's arguments by name, or None if it has some this pass does not know."""
    if len(node.args) > len(SDPA_ARGS) or set(node.kwargs) - set(SDPA_ARGS):
        return None
    return {**SDPA_DEFAULTS, **dict(zip(SDPA_ARGS, node.args)), **node.kwargs}


def _why_not(args: dict) -> str | None:
    """Why this attention cannot read the packed cache itself (None: it can)."""
    key, value = args["key"], args["value"]
    if any(isinstance(args[name], fx.Node) for name in ("dropout_p", "is_causal", "scale", "enable_gqa")):
        return "an SDPA flag is computed in the graph, not a constant"
    if args["dropout_p"] != 0.0:
        return f"attention dropout {args['dropout_p']}"
    if key.args[3:] != value.args[3:]:
        return "keys and values are stored with different bits, widths or dtypes"
    if len(key.users) != 1 or len(value.users) != 1:
        return "the dequantized cache has other readers than attention"
    return None


def _module_reading(node: fx.Node) -> str:
    """The attention module that reads ``node``'s value, for the report."""
    return label(next(iter(node.users)), default=node.name)


def fuse_packed_attention(ctx) -> None:
    """Pass: attention over a packed cache reads its codes (see the module docstring)."""
    graph = ctx.gm.graph
    explained = set()
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in SDPA:
            continue
        args = _sdpa_arguments(node)
        reads = [args.get(name) for name in ("key", "value")] if args else list(node.args[1:3])
        explained.update(reads)
        if not any(isinstance(r, fx.Node) and r.target is KV_DEQUANTIZE for r in reads):
            continue
        why = "SDPA called with arguments this pass does not know" if args is None else (
            "only one of keys and values comes from the packed cache"
            if not all(isinstance(r, fx.Node) and r.target is KV_DEQUANTIZE for r in reads) else _why_not(args))
        if why:
            ctx.report.skipped.append(Skip(f"packed attention at {_module_reading(node)}",
                                           f"{why}: attention reads the whole dequantized cache"))
            continue
        key, value = reads
        with graph.inserting_before(node):
            fused = graph.call_function(PACKED_ATTENTION, (
                args["query"], *key.args[:3], *value.args[:3], *key.args[3:6], args["attn_mask"], args["scale"],
                args["is_causal"], args["enable_gqa"]))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        for dead in (node, key, value):
            graph.erase_node(dead)
        ctx.report.counters["packed_attention"] += 1
    for node in graph.nodes:  # a packed cache read some other way (e.g. repeat_kv before SDPA)
        if node.op == "call_function" and node.target is KV_DEQUANTIZE and node not in explained:
            readers = ", ".join(sorted({op_name(u) for u in node.users}))
            ctx.report.skipped.append(Skip(f"packed attention at {_module_reading(node)}",
                                           f"the dequantized cache is read by {readers}, not directly by SDPA: "
                                           "attention reads the whole dequantized cache"))
    if ctx.report.counters["packed_attention"]:
        ctx.report.notes.append(
            f"KV cache: {ctx.report.counters['packed_attention']} attention calls read the packed cache block by "
            "block (packed_attention: C kernel at ≤ 16 query rows without a mask tensor, else dequantize + SDPA)")
