"""The pass pipeline: an ordered list of plain functions over one shared context.

``analyze_invariance`` reads the pristine graph and decides where each rotation can live;
the ``rotate_*`` and ``quantize_*`` passes rewrite it and record weight edits on sites;
``materialize_weights`` computes the edited weights once (cached across recompiles), packed
for ``quantized_linear`` with the integer kernels; ``lower_activation_quantizers`` then hands
those linears integer codes. GPTQ materializes the rotations first, since its Hessians come
from running the rotated graph. The runner times every pass and lints the graph after it, so
a broken rewrite fails at the pass that made it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.fx as fx

from quarot_fx.config import QuaRotConfig
from quarot_fx.report import Report, Skip

from .attention import (analyze_queries_keys, analyze_values, find_attentions, rotate_queries_keys, rotate_values,
                        unmatched_softmaxes)
from .calibrate import gptq_weights
from .down_projection import attention_output_sites, find_down_projections, rotate_down_projections
from .graph_utils import Site, label
from .lift_params import LiftedConstants
from .quantize import (lower_activation_quantizers, quantize_activations, quantize_kv_cache, quantize_weights,
                       quantized_sites)
from .residual import find_residual_streams, rotate_residual, skip_reasons
from .weights import (SiteEdits, drop_unused_constants, packed_weights, quantizes_last, replace_site_weights,
                      replace_with_quantized_linear, transformed_weights)


@dataclass
class Analysis:
    residual: list = field(default_factory=list)
    values: list = field(default_factory=list)
    queries_keys: list = field(default_factory=list)
    down_projections: list = field(default_factory=list)
    quantized: list = field(default_factory=list)  # sites whose weights and inputs are quantized


@dataclass
class PassContext:
    gm: fx.GraphModule
    config: QuaRotConfig
    report: Report
    lifted: LiftedConstants
    example_inputs: list = field(default_factory=list)
    analysis: Analysis = field(default_factory=Analysis)
    sites: dict = field(default_factory=dict)  # fx.Node -> SiteEdits
    kv_cache_inputs: set = field(default_factory=set)  # cache tensors read where K/V were rotated or quantized

    def edits(self, site: Site) -> SiteEdits:
        if site.node not in self.sites:
            self.sites[site.node] = SiteEdits(site, original_weight=site.weight_node.target)
        return self.sites[site.node]

    def fqn_of(self, attr: str) -> str:
        return self.lifted.fqn_by_attr.get(attr, attr)


Pass = Callable[[PassContext], None]


def analyze_invariance(ctx: PassContext) -> None:
    """Find R1–R4 sites on the untouched graph (each later pass only rewrites)."""
    gm, config = ctx.gm, ctx.config
    analysis = ctx.analysis
    analysis.residual = find_residual_streams(gm)
    ctx.report.skipped.extend(skip_reasons(analysis.residual, config))
    attentions = find_attentions(gm)
    wanted = [what for what, on in (("R2", config.rotates and config.r2), ("R3", config.rotates and config.r3),
                                     ("KV quantization", config.kv_bits < 16)) if on]
    for softmax in unmatched_softmaxes(gm, attentions):
        ctx.report.skipped.extend(Skip(f"{what} at {label(softmax)}", "a softmax that is not part of a recognized "
                                       "attention (scaled_dot_product_attention, or matmul(q, kᵀ) → softmax → "
                                       "matmul(·, v))") for what in wanted)
    analysis.values = [analyze_values(a) for a in attentions]
    analysis.queries_keys = [analyze_queries_keys(a) for a in attentions]
    readers = {site.node for plan in analysis.residual for site, _ in plan.readers}
    outputs = attention_output_sites(gm, attentions)
    analysis.down_projections = find_down_projections(gm, readers, outputs)
    analysis.quantized = quantized_sites(ctx)


def materialize_weights(ctx: PassContext) -> None:
    """Compute every edited weight once (cached by parameter) and point its site at it.

    Sites whose last edit quantizes to 4 bits become ``quantized_linear`` on packed weights
    when the integer kernels are on; the float weight is then never stored.
    """
    packed_bytes = fp16_bytes = 0
    for entry in ctx.sites.values():
        if not entry.edits:
            continue
        if ctx.config.packs_weights and quantizes_last(entry) and entry.site.kind != "embedding":
            packed, scales, bias, in_features = packed_weights(ctx.gm, entry, ctx.lifted.originals, ctx.fqn_of)
            size = packed.numel() + scales.numel() * scales.element_size()
            entry.online.append(f"quantized_linear: packed int4 weight + scales, {size / 1024:.1f} KiB")
            packed_bytes += size
            fp16_bytes += 2 * packed.shape[0] * in_features
            entry.site.node = replace_with_quantized_linear(ctx.gm, entry, packed, scales, bias, in_features)
            continue
        weight, bias = transformed_weights(ctx.gm, entry, ctx.lifted.originals, ctx.fqn_of)
        fqn = ctx.fqn_of(entry.site.weight_node.target)
        replace_site_weights(ctx.gm, entry, weight, bias)
        ctx.lifted.fqn_by_attr[entry.site.weight_node.target] = fqn  # later edits cache under the same name
    if packed_bytes:
        ctx.report.notes.append(f"integer kernels: quantized linears hold {packed_bytes / 2**20:.2f} MiB packed "
                                f"int4 + scales, {packed_bytes / fp16_bytes:.3f}× their fp16 size")
    elif ctx.config.kernels == "integer" and ctx.config.w_bits < 16 and any(map(quantizes_last, ctx.sites.values())):
        ctx.report.notes.append(f"integer kernels cover 4-bit weights: w{ctx.config.w_bits} linears run "
                                "simulated (dequantized float weights)")
    for entry in ctx.sites.values():
        fqn = ctx.fqn_of(entry.original_weight)
        linear = ctx.report.linear(label(entry.site.node, default=fqn.rpartition(".")[0]), entry.site.kind, fqn)
        linear.offline.extend(e.describe() for e in entry.edits)
        linear.online.extend(entry.online)
    ctx.sites.clear()  # a later phase (GPTQ) starts from the materialized weights
    drop_unused_constants(ctx.gm)


def passes_for(config: QuaRotConfig) -> list[Pass]:
    """The passes a config asks for, in order."""
    if not config.rotates and not config.quantizes:
        return []
    rotations = ((config.r1, rotate_residual), (config.r2, rotate_values),
                 (config.r3, rotate_queries_keys), (config.r4, rotate_down_projections))
    chosen = [analyze_invariance]
    chosen += [p for flag, p in rotations if flag and config.rotates]
    if config.w_bits < 16:
        # GPTQ needs the rotated weights in the graph to collect Hessians: materialize first.
        chosen += [materialize_weights, gptq_weights] if config.weights == "gptq" else [quantize_weights]
    chosen += [p for bits, p in ((config.a_bits, quantize_activations), (config.kv_bits, quantize_kv_cache))
               if bits < 16]
    chosen.append(materialize_weights)
    if config.packs_weights and config.a_bits < 16:
        chosen.append(lower_activation_quantizers)
    return chosen


def run_passes(ctx: PassContext, passes: list[Pass]) -> None:
    for pass_fn in passes:
        start = time.perf_counter()
        pass_fn(ctx)
        ctx.gm.graph.lint()
        ctx.gm.recompile()
        name = pass_fn.__name__
        name = name if name not in ctx.report.seconds else f"{name} (again)"
        ctx.report.seconds[name] = time.perf_counter() - start
