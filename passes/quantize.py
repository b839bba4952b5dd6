"""The quantization passes: each decision recorded on the graph as a fake quantizer or an edit.

* weights: every linear except the output head (see ``head.py``) gets a final ``QuantizeWeight`` edit, so
  the rounding sees the rotated, norm-folded weight and is cached with it
  (``materialize_weights`` then leaves it to the lowering as codes, or dequantized);
* activations: per-token quantization (the fake quantizer) on each quantized linear's input,
  after the online Hadamards the rotation passes put there; one quantizer per distinct input,
  shared by the linears that read it (q/k/v, gate/up);
* KV cache: keys after R3 and values after R2, before the cache ``cat``, so prefill and
  every decode step attend over quantized keys and values.

The lowerings (``lowering.py``) turn these into integer ops or their simulated twins.
"""

from __future__ import annotations

import torch.fx as fx

from quarot_fx.numerics.quant import quantize_activation, quantize_kv
from quarot_fx.report import QuantRecord, Skip

from .attention import only_used_along, walk_back
from .edits import QuantizeWeight
from .graph_utils import as_site, keeps_last_dim, label, value

RECORD = "quarot_quant"  # node.meta key: the QuantRecord of a quantizer node
KV_LIKE = "quarot_kv_like"  # node.meta key: the tensor (shape, dtype) a KV quantizer's output stands for


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
        if feeds_output(node) and ctx.config.quantize_lm_head is not True:  # "auto", "int8", "w8a8": head.py
            continue
        sites.append(site)
    return sites


def quantize_weights(ctx) -> None:
    """Pass: RTN (with per-row clip search) on every quantized linear, after its rotations."""
    config = ctx.config
    edit = QuantizeWeight(config.w_bits, config.w_group_size, config.w_clip_search, config.weights)
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
        clip = "searched" if config.a_clip == "gbs" else config.activation_clip
        ctx.edits(site).online.append(f"a{config.a_bits} per-token (clip {clip})")


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
            with ctx.gm.graph.inserting_before(consumer):
                quantized = ctx.gm.graph.call_function(quantize_kv, (source, config.kv_bits, config.kv_cache_clip))
            record = QuantRecord(label(attention.output), name, config.kv_bits, "asymmetric per head",
                                 config.kv_cache_clip)
            quantized.meta[RECORD] = record
            quantized.meta[KV_LIKE] = value(attention.operand(name))  # shape and dtype Dynamo recorded
            if "example_value" in source.meta:  # same shape and dtype as what it quantizes
                quantized.meta["example_value"] = source.meta["example_value"]
            consumer.replace_input_with(source, quantized)
            ctx.kv_cache_inputs.update(path.cache_inputs)
            inserted += 1
            ctx.report.quantized.append(record)
    ctx.report.counters["kv_tensors_quantized"] += inserted
    if not inserted:
        return
    ctx.report.notes.append(f"KV cache: {inserted} key/value tensors quantized to {config.kv_bits} bits, asymmetric "
                            f"per head (clip {config.kv_cache_clip}), before the cache. A PackedKVCache (which the "
                            "compiled model creates) stores the codes; transformers' own caches hold float tensors, "
                            "so there the cache keeps the dequantized values")
