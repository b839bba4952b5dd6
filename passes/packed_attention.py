"""Attention straight from the packed KV cache.

After ``close_packed_cache`` a layer's attention reads ``kv_dequantize`` of the whole stored
cache, keys and values each: a float copy of the layer's cache, made every decode step only to
be read once. This pass rewrites ``scaled_dot_product_attention(q, kv_dequantize(K),
kv_dequantize(V), …)`` into ``quarot_fx::packed_attention(q, K…, V…, …)``, whose CPU kernel
dequantizes one block of tokens at a time inside attention (``kernels/packed_attention.py``).
With ``prefill_attention="int8"`` a causal prefill's op is ``quarot_fx::int8_query_attention`` (the
same, with Q·Kᵀ in integers). Only where the dequantized cache has no other reader and every SDPA
argument but the tensors is a constant with dropout 0; anything else stays as it was, and the
report says why.

Between the dequantized cache and SDPA the pass sees through what commutes with a per-token
dequantizer: a slice of the tokens (a static cache's prefill reads its first tokens; the slice moves
onto the codes, scales and zero points) and transformers' ``repeat_kv`` (``x[:, :, None]
.expand(...).reshape(...)``, which SDPA's ``enable_gqa`` does without the copy), and reads of the
cache's size (answered from the codes). So a static packed cache, whose decode graph has a mask
and repeats heads, reads its codes too: one graph for every position, no copy of the cache.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from quarot_fx.kernels.kv_quant import KV_DEQUANTIZE
from quarot_fx.report import Skip

from .graph_utils import first_arg, label, op_name, value

PACKED_ATTENTION = torch.ops.quarot_fx.packed_attention.default
INT8_QUERY_ATTENTION = torch.ops.quarot_fx.int8_query_attention.default
SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _sdpa_arguments(node: fx.Node) -> dict | None:
    """SDPA's arguments by name, or None if it has some this pass does not know."""
    if len(node.args) > len(SDPA_ARGS) or set(node.kwargs) - set(SDPA_ARGS):
        return None
    return {**SDPA_DEFAULTS, **dict(zip(SDPA_ARGS, node.args)), **node.kwargs}


def _size_reads(node: fx.Node, between: list) -> list | None:
    """The readers of a dequantized cache other than ``between`` (the way to attention), if each only reads
    its batch, head or token count (which the codes have too), else None."""
    reads = []
    for user in node.users:
        if user in between:
            continue
        dims = user.args[1:2] if op_name(user) in ("size", "sym_size") and user.args[0] is node else None
        if dims is None:
            return None
        if not dims:  # x.size(): every use must index it
            dims = [u.args[1] if op_name(u) == "getitem" else None for u in user.users]
        if not all(isinstance(d, int) and -4 <= d <= 2 and d != -1 for d in dims):
            return None
        reads.append(user)
    return reads


def _why_not(attention: fx.Node, args: dict, reads: list) -> str | None:
    """Why this attention cannot read the packed cache itself (None: it can)."""
    (key, k_index, k_repeated, k_between), (value, v_index, v_repeated, v_between) = reads
    if any(isinstance(args[name], fx.Node) for name in ("dropout_p", "is_causal", "scale", "enable_gqa")):
        return "an SDPA flag is computed in the graph, not a constant"
    if args["dropout_p"] != 0.0:
        return f"attention dropout {args['dropout_p']}"
    if key.args[3:] != value.args[3:]:
        return "keys and values are stored with different bits, widths or dtypes"
    if k_index != v_index or k_repeated != v_repeated:
        return "keys and values are sliced or repeated differently"
    if any(len(n.users) != 1 for n in k_between + v_between) or key is value \
            or _size_reads(key, [*k_between, attention]) is None or _size_reads(value, [*v_between, attention]) is None:
        return "the dequantized cache has other readers than attention"
    return None


def _known(claim) -> bool:
    return bool(statically_known_true(claim))


def _repeated_heads(reshape: fx.Node):
    """``x[:, :, None].expand(b, h, n, s, d).reshape(b, h·n, s, d)`` (transformers' repeat_kv:
    query head i reads kv head i // n, as SDPA's enable_gqa) → (x, [the three nodes]), else None."""
    expand = first_arg(reshape)
    if op_name(reshape) not in ("reshape", "view") or not isinstance(expand, fx.Node) or op_name(expand) != "expand":
        return None
    inserted = first_arg(expand)
    full = slice(None, None, None)
    if not (isinstance(inserted, fx.Node) and op_name(inserted) == "getitem"
            and inserted.args[1] == (full, full, None, full, full) and isinstance(inserted.args[0], fx.Node)):
        return None
    x, source, repeated, merged = (value(n) for n in (inserted.args[0], inserted, expand, reshape))
    if not all(isinstance(t, torch.Tensor) for t in (x, source, repeated, merged)) or x.dim() != 4 \
            or repeated.dim() != 5 or merged.dim() != 4:
        return None
    b, h, s_, d = x.shape
    n = repeated.shape[2]
    same = [_known(repeated.shape[i] == x.shape[j]) for i, j in ((0, 0), (1, 1), (3, 2), (4, 3))]
    merged_ok = [_known(merged.shape[0] == b), _known(merged.shape[1] == h * n), _known(merged.shape[2] == s_),
                 _known(merged.shape[3] == d)]
    if not all(same + merged_ok):
        return None
    return inserted.args[0], [reshape, expand, inserted]


def _token_slice(node: fx.Node):
    """``x[:, :, a:b]`` (only the token dim sliced) → (x, index), else None."""
    if op_name(node) != "getitem" or not isinstance(node.args[0], fx.Node):
        return None
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    full = slice(None, None, None)
    if len(index) < 3 or len(index) > 4 or not all(isinstance(i, slice) for i in index) \
            or any(i != full for j, i in enumerate(index) if j != 2) or index[2].step not in (None, 1):
        return None
    return node.args[0], index


def _cache_read(node):
    """How SDPA's key or value argument reads a packed cache: (kv_dequantize node, token index or
    None, heads repeated, the nodes between, SDPA's side first), or None when it does not read
    one (or reads it in a way this pass does not know)."""
    between, index, repeated = [], None, False
    if isinstance(node, fx.Node) and (found := _repeated_heads(node)):
        node, nodes = found
        between, repeated = nodes, True
    if isinstance(node, fx.Node) and (found := _token_slice(node)):
        between.append(node)
        node, index = found
    if not (isinstance(node, fx.Node) and node.target is KV_DEQUANTIZE):
        return None
    return node, index, repeated, between


def _module_reading(node: fx.Node) -> str:
    """The attention module that reads ``node``'s value, for the report."""
    return label(next(iter(node.users)), default=node.name)


def _sliced(graph: fx.Graph, parts: tuple, index) -> tuple:
    """The cache's (codes, scale, zero) nodes, sliced over tokens as attention read them."""
    if index is None:
        return parts
    return tuple(graph.call_function(operator.getitem, (part, index)) for part in parts)


def _attention_op(config, args: dict):
    """``int8_query_attention`` where ``prefill_attention="int8"`` and the attention is a causal
    prefill (``is_causal``: a prompt into an empty cache; transformers passes a mask instead once
    the cache holds tokens) that may have more rows than a decode step (``native.FEW_ROWS``), else
    ``packed_attention``: a decode graph keeps the op whose calls reach the C kernel without
    Python (``native_ops``)."""
    from quarot_fx.kernels.native import FEW_ROWS

    query = value(args["query"])
    rows = query.shape[2] if isinstance(query, torch.Tensor) and query.dim() == 4 else None
    few = rows is not None and _known(rows <= FEW_ROWS)
    prefill = args["is_causal"] is True and not few
    return INT8_QUERY_ATTENTION if config.prefill_attention == "int8" and prefill else PACKED_ATTENTION


def fuse_packed_attention(ctx) -> None:
    """Pass: attention over a packed cache reads its codes (see the module docstring)."""
    graph = ctx.gm.graph
    explained = set()
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in SDPA:
            continue
        args = _sdpa_arguments(node)
        reads = [_cache_read(r) for r in ([args.get(name) for name in ("key", "value")] if args else node.args[1:3])]
        if not any(reads):
            continue
        explained.update(r[0] for r in reads if r)
        why = "SDPA called with arguments this pass does not know" if args is None else (
            "only one of keys and values comes from the packed cache" if not all(reads) else _why_not(node, args, reads))
        if why:
            ctx.report.skipped.append(Skip(f"packed attention at {_module_reading(node)}",
                                           f"{why}: attention reads the whole dequantized cache"))
            continue
        (key, index, repeated, k_between), (value, _, _, v_between) = reads
        with graph.inserting_before(node):
            target = _attention_op(ctx.config, args)
            fused = graph.call_function(target, (
                args["query"], *_sliced(graph, key.args[:3], index), *_sliced(graph, value.args[:3], index),
                *key.args[3:6], args["attn_mask"], args["scale"], args["is_causal"], args["enable_gqa"] or repeated))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        for dead in k_between + v_between:
            graph.erase_node(dead)
        for dequantized in (key, value):
            for size in _size_reads(dequantized, []):  # the codes have the same batch, heads and tokens
                size.replace_input_with(dequantized, dequantized.args[0])
            graph.erase_node(dequantized)
        ctx.report.counters["packed_attention"] += 1
        ctx.report.counters["int8_query_attention"] += target is INT8_QUERY_ATTENTION
    for node in graph.nodes:  # a packed cache read some other way
        if node.op == "call_function" and node.target is KV_DEQUANTIZE and node not in explained:
            readers = ", ".join(sorted({op_name(u) for u in node.users}))
            ctx.report.skipped.append(Skip(f"packed attention at {_module_reading(node)}",
                                           f"the dequantized cache is read by {readers}, not directly by SDPA: "
                                           "attention reads the whole dequantized cache"))
    if ctx.report.counters["packed_attention"]:
        ctx.report.notes.append(
            f"KV cache: {ctx.report.counters['packed_attention']} attention calls read the packed cache block by "
            "block (packed_attention: C kernel at ≤ 16 query rows, else dequantize + SDPA)")
        if ctx.report.counters["int8_query_attention"]:
            ctx.report.notes.append(
                f"prefill_attention='int8': {ctx.report.counters['int8_query_attention']} causal prefill attention "
                "calls round the queries to int8 per row and compute Q·Kᵀ on the 4-bit key codes in integers "
                "(float32 on a CPU with AVX2); decode steps, masked calls and other devices stay float "
                "(packed_attention)")
