"""The analysis pass: where each rotation can live, found once on the untouched graph."""

from __future__ import annotations

from quarot_fx.report import Skip

from .attention import analyze_queries_keys, analyze_values, find_attentions, unmatched_softmaxes
from .down_projection import attention_output_sites, find_down_projections
from .graph_utils import label
from .quantize import quantized_sites
from .residual import find_residual_streams, skip_reasons


def analyze_invariance(ctx) -> None:
    """Find R1–R4 sites on the untouched graph (each later pass only rewrites)."""
    gm, config = ctx.gm, ctx.config
    analysis = ctx.analysis
    analysis.residual = find_residual_streams(gm)
    ctx.report.skipped.extend(skip_reasons(analysis.residual, config))
    attentions = find_attentions(gm)
    wanted = [what for what, on in (("R2", config.rotates and config.r2), ("R3", config.rotates and config.applies_r3),
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
