"""A packed KV cache in the graph: open its quantize → store → dequantize chain, close it at the end.

With :class:`quarot_fx.kv_cache.PackedKVCache` Dynamo traces, per layer and for keys and values::

    q = kv_quantize(x, bits, 1.0)            # the cache's own quantizer
    stored = cat([past, q], -2)             # or, static: index_copy_(buffer, 2, position, q)
    attention_input = kv_dequantize(stored) # what attention reads

The rotation and quantization passes know a float cache: ``cat([past, x])`` straight into
attention. So :func:`open_packed_cache` gives them that form, ``cat([kv_dequantize(past), x])``
(static: ``index_copy(kv_dequantize(buffer), 2, position, x)``), leaving the store in the graph
with its quantizer marked (:data:`CACHE_STORE`) so that analyses ignore it. They then rotate and
insert their fake KV quantizer on the fresh operand as usual. :func:`close_packed_cache` puts the
chain back: the cache's quantizer takes the fresh operand (rotated) with the fake quantizer's bits
and clip, the fake quantizer goes, and attention reads the dequantized store again. Only layout
ops (transposes, views) may sit between the fake quantizer and the store; they commute with a
per-vector quantizer, so the stored codes are exactly the integer path's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.fx as fx

from quarot_fx.kernels.kv_quant import KV_DEQUANTIZE, KV_QUANTIZE
from quarot_fx.numerics.quant import quantize_kv
from quarot_fx.report import Skip

from .graph_utils import CACHE_STORE, first_arg, keeps_last_dim, label, op_name
from .graph_utils import arg as argument
from .quantize import RECORD

DTYPE_CHANGES = {"to", "float", "half", "bfloat16", "double", "type", "type_as", "_to_copy"}


@dataclass
class PackedChain:
    quantizer: fx.Node  # the cache's kv_quantize
    stored: tuple  # codes, scale, zero as attention reads them (cat outputs, or static buffers)
    store_nodes: list  # getitems, conversions and cat / index_copy_ writing the store, graph order
    float_form: fx.Node  # cat / index_copy the passes see instead
    past: fx.Node  # kv_dequantize of the past store, inside float_form
    bits: int
    length: int
    dtype: torch.dtype


def fake_value(node: fx.Node):
    """The node's example value, computed on its inputs' (fake) example values."""
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["example_value"])
    modes = [t.fake_mode for t in torch.utils._pytree.tree_leaves((args, kwargs)) if hasattr(t, "fake_mode")]
    with modes[0] if modes else contextlib.nullcontext():
        return node.target(*args, **kwargs)


def _from_quantizer(node) -> tuple[fx.Node, int] | None:
    """(kv_quantize node, output index) for ``getitem(kv_quantize(x), i)``, through a dtype cast."""
    if isinstance(node, fx.Node) and op_name(node) in DTYPE_CHANGES:
        node = first_arg(node)
    if isinstance(node, fx.Node) and op_name(node) == "getitem" and isinstance(node.args[0], fx.Node) \
            and node.args[0].target is KV_QUANTIZE:
        return node.args[0], node.args[1]
    return None


def _appended(arg):
    """Dynamic store: ``cat([past, new], dim)`` → (past, new, dim)."""
    if op_name(arg) != "cat":
        return None
    tensors = arg.args[0]
    dim = argument(arg, 1, "dim", 0)
    return (tensors[0], tensors[1], dim) if len(tensors) == 2 else None


def _written(arg, before: fx.Node, order: dict):
    """Static store: the ``index_copy_(arg, dim, position, new)`` before ``before``."""
    writes = [u for u in arg.users if op_name(u) == "index_copy_" and u.args[0] is arg and order[u] < order[before]]
    return writes[0] if len(writes) == 1 else None


def _chain(dequantize: fx.Node) -> PackedChain | None:
    parts, bits, length, dtype = dequantize.args[:3], *dequantize.args[3:6]
    graph = dequantize.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    appended = [_appended(a) for a in parts]
    if all(appended):  # grows: the store is the cat, the past its first operand
        sources = [_from_quantizer(new) for _, new, _ in appended]
        pasts = [past for past, _, _ in appended]
        kind, dim, writes = "cat", appended[0][2], list(parts)
    else:  # static: the store is the buffer, written in place before attention reads it
        writes = [_written(a, dequantize, order) for a in parts]
        if not all(writes):
            return None
        sources = [_from_quantizer(w.args[3]) for w in writes]
        pasts, kind, dim = list(parts), "index_copy", writes[0].args[1]
    if not all(sources) or len({q for q, _ in sources}) != 1 or [i for _, i in sources] != [0, 1, 2]:
        return None
    quantizer = sources[0][0]
    store_nodes, frontier = set(), list(quantizer.users)
    while frontier:  # from the quantizer to the writes (getitems, casts)
        node = frontier.pop()
        if node not in store_nodes:
            store_nodes.add(node)
            frontier.extend([] if node in writes else node.users)
    store_nodes = sorted(store_nodes, key=order.__getitem__)
    first_write = min(writes, key=order.__getitem__)
    with graph.inserting_before(first_write if kind == "index_copy" else dequantize):
        past = graph.call_function(KV_DEQUANTIZE, (*pasts, bits, length, dtype))
    x = quantizer.args[0]
    with graph.inserting_before(dequantize):
        if kind == "cat":
            float_form = graph.call_function(torch.cat, ([past, x], dim))
        else:
            float_form = graph.call_function(torch.index_copy, (past, dim, writes[0].args[2], x))
    for new in (past, float_form):
        new.meta["example_value"] = fake_value(new)
    dequantize.replace_all_uses_with(float_form)
    graph.erase_node(dequantize)
    quantizer.meta[CACHE_STORE] = True
    return PackedChain(quantizer, tuple(parts), store_nodes, float_form, past, bits, length, dtype)


def open_packed_cache(ctx) -> None:
    """Pass: give attention a float-cache view of every packed cache (see the module docstring)."""
    config = ctx.config
    for node in [n for n in ctx.gm.graph.nodes if n.op == "call_function" and n.target is KV_DEQUANTIZE]:
        chain = _chain(node)
        if chain is None:
            continue
        if config.kv_bits != chain.bits:
            raise ValueError(
                f"quarot-fx: the KV cache passed is a packed cache of {chain.bits}-bit codes, but this model was "
                f"compiled with kv_bits={config.kv_bits}: compile with kv_bits={chain.bits}, or pass a "
                f"PackedKVCache(config, bits={config.kv_bits}) (kv_bits=16: a DynamicCache).")
        ctx.packed_chains.append(chain)
    ctx.report.counters["packed_kv_stores"] += len(ctx.packed_chains)


def _fake_quantizer(fresh: fx.Node) -> fx.Node | None:
    """The fake KV quantizer behind ``fresh`` through layout ops only (they commute with it)."""
    current = fresh
    while isinstance(current, fx.Node):
        if current.target is quantize_kv:
            return current
        src = first_arg(current)
        if not (isinstance(src, fx.Node) and keeps_last_dim(current, src) and op_name(current) not in DTYPE_CHANGES
                and len([u for u in current.users if not u.meta.get(CACHE_STORE)]) == 1):
            return None
        current = src
    return None


def close_packed_cache(ctx) -> None:
    """Pass: the packed cache stores the fresh (rotated) keys/values with the compiled kv_bits and clip."""
    graph = ctx.gm.graph
    for chain in ctx.packed_chains:
        form = chain.float_form
        fresh = form.args[0][1] if op_name(form) == "cat" else form.args[3]
        fake = _fake_quantizer(fresh)
        quantizer = chain.quantizer
        if fake is not None:
            clip = fake.args[2]
            record = fake.meta.get(RECORD)
            fake.replace_all_uses_with(fake.args[0])
            graph.erase_node(fake)
            if record is not None:
                record.storage = "packed cache"
                quantizer.meta[RECORD] = record
        else:
            clip = quantizer.args[2]
            ctx.report.skipped.append(Skip(
                f"KV quantization at {label(form)}",
                f"no KV quantizer in front of the packed cache: it stores {chain.bits}-bit codes at clip {clip}"))
        fresh = form.args[0][1] if op_name(form) == "cat" else form.args[3]  # the fake quantizer may be gone
        for node in [quantizer, *chain.store_nodes]:  # after the fresh operand, which may be new (R3)
            form.prepend(node)
        quantizer.args = (fresh, chain.bits, clip)
        with graph.inserting_before(form):
            read = graph.call_function(KV_DEQUANTIZE, (*chain.stored, chain.bits, chain.length, chain.dtype))
        read.meta["example_value"] = form.meta["example_value"]
        form.replace_all_uses_with(read)
        graph.erase_node(form)
        graph.erase_node(chain.past)
    if ctx.packed_chains:
        bits = ctx.packed_chains[0].bits
        ctx.report.notes.append(f"KV cache: packed, {len(ctx.packed_chains)} key/value stores hold {bits}-bit codes, a "
                                "float32 scale and a uint8 zero point per head vector (passes/kv_cache.py)")
