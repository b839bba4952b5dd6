"""Quantization passes.

* weights: every linear except the output head gets a final ``QuantizeWeight`` edit, so
  the rounding sees the rotated, norm-folded weight and is cached with it
  (``materialize_weights`` then stores it packed, or dequantized with ``kernels="fake"``);
* activations: per-token quantization (the fake quantizer, first) on each quantized
  linear's input, after the online Hadamards the rotation passes put there; one quantizer
  per distinct input, shared by the linears that read it (q/k/v, gate/up);
* KV cache: keys after R3 and values after R2, before the cache ``cat``, so prefill and
  every decode step attend over quantized keys and values;
* ``lower_activation_quantizers`` (integer kernels): a fake quantizer feeding packed linears
  becomes ``quarot_fx::quantize_per_token``, fused with the Hadamard right before it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from quarot_fx.quant import quantize_activation, quantize_kv
from quarot_fx.report import QuantRecord, Skip

from .attention import HADAMARD_OP, only_used_along, walk_back
from .graph_utils import as_site, keeps_last_dim, label, value
from .weights import QUANTIZED_LINEAR, QuantizeWeight

QUANTIZE_PER_TOKEN = torch.ops.quarot_fx.quantize_per_token.default
KV_QUANTIZE = torch.ops.quarot_fx.kv_quantize.default
KV_DEQUANTIZE = torch.ops.quarot_fx.kv_dequantize.default
RECORD = "quarot_quant"  # node.meta key: the QuantRecord of a quantizer node


def feeds_output(node: fx.Node) -> bool:
    """The value reaches a graph output through conversions/reshapes only (the logits head)."""
    frontier = [node]
    for _ in range(8):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user.op == "output":
                    return True
                if keeps_last_dim(user, n):
                    nxt.append(user)
        frontier = nxt
    return False


def quantized_sites(ctx) -> list:
    """Linear/addmm sites whose weights and inputs are quantized."""
    sites = []
    for node in ctx.gm.graph.nodes:
        site = as_site(node)
        if site is None or site.kind == "embedding":
            continue
        if feeds_output(node) and not ctx.config.quantize_lm_head:
            continue
        sites.append(site)
    return sites


def quantize_weights(ctx) -> None:
    """Pass: RTN (with per-row clip search) on every quantized linear, after its rotations."""
    config = ctx.config
    edit = QuantizeWeight(config.w_bits, config.w_group_size, config.w_clip_search)
    for site in ctx.analysis.quantized:
        ctx.edits(site).edits.append(edit)


def quantize_activations(ctx) -> None:
    """Pass: per-token symmetric quantization of each quantized linear's input."""
    config = ctx.config
    quantizers: dict[fx.Node, fx.Node] = {}
    for site in ctx.analysis.quantized:  # in graph order: the first reader of a value comes first
        node, source = site.node, site.input_node
        if source not in quantizers:
            with ctx.gm.graph.inserting_before(node):
                quantizers[source] = ctx.gm.graph.call_function(
                    quantize_activation, (source, config.a_bits, config.activation_clip))
            record = QuantRecord(label(node), "activation", config.a_bits, "per-token symmetric", config.activation_clip)
            quantizers[source].meta[RECORD] = record  # the lowering reads the decision from the graph
            ctx.report.quantized.append(record)
        node.replace_input_with(source, quantizers[source])
        ctx.edits(site).online.append(f"a{config.a_bits} per-token (clip {config.activation_clip})")


def _integer_kv(graph: fx.Graph, source: fx.Node, bits: int, clip: float, like) -> fx.Node:
    """kv_dequantize(kv_quantize(source)): the codes a packed cache would hold, read back."""
    quantized = graph.call_function(KV_QUANTIZE, (source, bits, clip))
    parts = [graph.call_function(operator.getitem, (quantized, i)) for i in range(3)]
    return graph.call_function(KV_DEQUANTIZE, (*parts, bits, like.shape[-1], like.dtype))


def quantize_kv_cache(ctx) -> None:
    """Pass: asymmetric per-head quantization of keys and values where they enter the cache."""
    config = ctx.config
    inserted = 0
    for attention in [p.attention for p in ctx.analysis.values]:
        for name in ("key", "value"):
            path = walk_back(attention.operand(name))
            if path.cache_inputs and not only_used_along(path, attention):
                ctx.report.skipped.append(Skip(f"KV quantization of {name}s at {label(attention.output)}",
                                               "the cached tensor is also used outside attention"))
                continue
            source = path.source
            consumer = path.nodes[-1] if path.nodes else attention.consumer(name)  # source: [..., head_dim]
            like = value(attention.operand(name))  # shape and dtype Dynamo recorded
            integer = config.kernels == "integer" and isinstance(like, torch.Tensor)
            with ctx.gm.graph.inserting_before(consumer):
                quantized = (_integer_kv(ctx.gm.graph, source, config.kv_bits, config.kv_cache_clip, like)
                             if integer else
                             ctx.gm.graph.call_function(quantize_kv, (source, config.kv_bits, config.kv_cache_clip)))
            consumer.replace_input_with(source, quantized)
            ctx.kv_cache_inputs.update(path.cache_inputs)
            inserted += 1
            ctx.report.quantized.append(QuantRecord(label(attention.output), name, config.kv_bits, "asymmetric per head",
                                                    config.kv_cache_clip, "integer op" if integer else "simulated"))
    ctx.report.counters["kv_tensors_quantized"] += inserted
    if not inserted:
        return
    how = "kv_quantize/kv_dequantize ops" if config.kernels == "integer" else "fake quantization"
    ctx.report.notes.append(f"KV cache: {inserted} key/value tensors quantized to {config.kv_bits} bits, asymmetric "
                            f"per head (clip {config.kv_cache_clip}), before the cache ({how}); the cache "
                            "object itself stores the dequantized values (transformers' caches hold float tensors)")


def lower_activation_quantizers(ctx) -> None:
    """Pass: fake activation quantizers that feed packed linears become integer codes."""
    graph = ctx.gm.graph
    fused = 0
    for fake in [n for n in graph.nodes if n.op == "call_function" and n.target is quantize_activation]:
        linears = [u for u in fake.users if u.target is QUANTIZED_LINEAR and u.args[0] is fake and u.args[1] is None]
        if not linears:
            continue
        source, bits, clip = fake.args
        inner = 0
        if (len(linears) == len(fake.users) and source.op == "call_function" and source.target is HADAMARD_OP
                and len(source.users) == 1):
            source, inner = source.args  # fuse the online Hadamard into the quantizer
        with graph.inserting_before(fake):
            quantized = graph.call_function(QUANTIZE_PER_TOKEN, (source, bits, clip, inner))
            codes, scales = (graph.call_function(operator.getitem, (quantized, i)) for i in range(2))
        for linear in linears:
            linear.args = (codes, scales, *linear.args[2:])
        if RECORD in fake.meta:
            fake.meta[RECORD].storage = "integer op"
        if not fake.users:
            rotation = fake.args[0]
            graph.erase_node(fake)
            if inner:
                graph.erase_node(rotation)
                fused += 1
    ctx.report.counters["fused_hadamards"] += fused
    if fused:
        ctx.report.notes.append(f"integer kernels: {fused} online Hadamards fused into activation quantization")
