"""Quantization passes (simulated: quantize-dequantize in float; packed kernels come later).

* weights: every linear except the output head gets a final ``QuantizeWeight`` edit, so
  the rounding sees the rotated, norm-folded weight and is cached with it;
* activations: per-token quantization inserted on each quantized linear's input, after
  the online Hadamards the rotation passes put there;
* KV cache: keys after R3 and values after R2, before the cache ``cat``, so prefill and
  every decode step attend over quantized keys and values.
"""

from __future__ import annotations

import torch.fx as fx

from quarot_fx.quant import quantize_activation, quantize_kv
from quarot_fx.report import Skip

from .attention import only_used_along, sdpa_input, walk_back
from .graph_utils import as_site, keeps_last_dim, label
from .weights import QuantizeWeight


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
    for site in ctx.analysis.quantized:
        node, value = site.node, site.input_node
        with ctx.gm.graph.inserting_before(node):
            quantized = ctx.gm.graph.call_function(quantize_activation, (value, config.a_bits, config.activation_clip))
        node.replace_input_with(value, quantized)
        ctx.edits(site).online.append(f"a{config.a_bits} per-token (clip {config.activation_clip})")


def quantize_kv_cache(ctx) -> None:
    """Pass: asymmetric per-head quantization of keys and values where they enter the cache."""
    config = ctx.config
    for attention in [p.attention for p in ctx.analysis.values]:
        for index, name in ((1, "key"), (2, "value")):
            path = walk_back(sdpa_input(attention, index, name))
            if path.cache_inputs and not only_used_along(path, attention):
                ctx.report.skipped.append(Skip(f"KV quantization of {name}s at {label(attention)}",
                                               "the cached tensor is also used outside attention"))
                continue
            source = path.source
            consumer = path.nodes[-1] if path.nodes else attention  # source: [..., head_dim]
            with ctx.gm.graph.inserting_before(consumer):
                quantized = ctx.gm.graph.call_function(quantize_kv, (source, config.kv_bits, config.kv_cache_clip))
            consumer.replace_input_with(source, quantized)
    ctx.report.notes.append(f"KV cache: keys and values quantized to {config.kv_bits} bits, asymmetric per "
                            f"head (clip {config.kv_cache_clip}), before the cache")
