"""The built-in passes' place in the pipeline, and the runner (see ``registry`` for the order rules).

``analyze_invariance`` reads the pristine graph and decides where each rotation can live;
the ``rotate_*`` and ``quantize_*`` passes rewrite it and record weight edits on sites;
``materialize_weights`` computes the edited weights once (cached across recompiles), leaving
4-bit weights for ``lower_to_integer_kernels`` to pack, which also turns the fake activation and
KV quantizers into integer ops. GPTQ materializes the rotations first, since its Hessians come
from running the rotated graph. The runner times every pass and lints the graph after it, so
a broken rewrite fails at the pass that made it.
"""

from __future__ import annotations

import time

from quarot_fx.config import QuaRotConfig
from quarot_fx.report import Skip

from .attention import (analyze_queries_keys, analyze_values, find_attentions, rotate_queries_keys, rotate_values,
                        unmatched_softmaxes)
from .calibrate import gptq_weights
from .observe import observe_inputs
from .sparsity import prunes, record_sparsity
from .clip_search import search_clips
from .down_projection import attention_output_sites, find_down_projections, rotate_down_projections
from .context import Analysis, PassContext  # noqa: F401  (re-exported: the context passes take)
from .graph_utils import label
from .kv_cache import close_packed_cache, open_packed_cache
from .packed_attention import fuse_packed_attention
from .quantize import PENDING_WEIGHT, lower_to_integer_kernels, quantize_activations, quantize_kv_cache, quantize_weights
from .quantize import keeps_codes, lower_to_simulated_linears, quantized_sites
from .residual import find_residual_streams, rotate_residual, skip_reasons
from .smoothrot import smooth_down_projections
from .registry import RegisteredPass, ordered_passes, register_pass
from .weights import (deferred_codes, drop_unused_constants, quantizes_last, record_final_weight,
                      replace_site_weights, transformed_weights, weight_record)


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

    A 4-bit weight quantization that the lowering keeps as codes stays pending: the site's node
    records it (``node.meta``) and ``lower_to_integer_kernels`` packs it (or
    ``lower_to_simulated_linears`` hands the codes to the fake path's simulated linear), so the
    float form of that weight is never computed.
    """
    for entry in ctx.sites.values():
        if not entry.edits:
            continue
        record = None
        if quantizes_last(entry):
            record = weight_record(ctx.fqn_of(entry.original_weight), entry.edits[-1])
            ctx.report.quantized.append(record)
        if record is not None and keeps_codes(ctx, entry):
            entry.site.node.meta[PENDING_WEIGHT] = (entry, record)
            continue
        weight, bias = transformed_weights(ctx.gm, entry, ctx.lifted.originals, ctx.fqn_of)
        codes = deferred_codes(ctx.gm, entry, ctx.lifted.originals, ctx.fqn_of) if record is not None else None
        module = label(entry.site.node, default=ctx.fqn_of(entry.original_weight).rpartition(".")[0])
        record_final_weight(ctx, module, entry, weight, bias, codes)
        if prunes(entry):
            record_sparsity(ctx.report, entry.site.to_logical(weight), entry.edits[-1])
        fqn = ctx.fqn_of(entry.site.weight_node.target)
        replace_site_weights(ctx.gm, entry, weight, bias)
        ctx.lifted.fqn_by_attr[entry.site.weight_node.target] = fqn  # later edits cache under the same name
    for entry in ctx.sites.values():
        fqn = ctx.fqn_of(entry.original_weight)
        linear = ctx.report.linear(label(entry.site.node, default=fqn.rpartition(".")[0]), entry.site.kind, fqn)
        linear.offline.extend(e.describe() for e in entry.edits)
        linear.online.extend(entry.online)
    ctx.sites.clear()  # a later phase (GPTQ) starts from the materialized weights
    drop_unused_constants(ctx.gm)


# The built-in pipeline, in order. GPTQ materializes the rotations before its own weight step,
# since its Hessians come from running the rotated graph; sequential GPTQ runs after the
# activation and KV quantizers are in place.
def _gptq(config):
    return config.calibrates_weights  # GPTQ, OBR, or a Wanda mask (RTN after it)


for _stage, _fn, _when, _name in (
    ("analysis", analyze_invariance, lambda c: c.transforms, None),
    ("rotation", rotate_residual, lambda c: c.rotates and c.r1, None),
    ("rotation", rotate_values, lambda c: c.rotates and c.r2, None),
    ("rotation", rotate_queries_keys, lambda c: c.rotates and c.r3, None),
    ("rotation", rotate_down_projections, lambda c: c.rotates and c.r4, None),
    ("weights", materialize_weights, _gptq, "materialize_rotations"),
    ("weights", gptq_weights, lambda c: _gptq(c) and not c.gptq_sequential, None),
    ("weights", quantize_weights, lambda c: c.w_bits < 16 and not c.calibrates_weights, None),
    ("activations", quantize_activations, lambda c: c.a_bits < 16, None),
    ("activations", quantize_kv_cache, lambda c: c.kv_bits < 16, None),
    # Sequential GPTQ sees the activations and KV cache quantized as configured.
    ("activations", gptq_weights, lambda c: _gptq(c) and c.gptq_sequential, "gptq_sequential"),
    ("materialize", materialize_weights, lambda c: c.transforms, None),
    ("lower", lower_to_integer_kernels, lambda c: c.kernels == "integer" and c.quantizes, None),
    ("lower", lower_to_simulated_linears, lambda c: c.kernels == "fake" and c.keeps_weight_codes, None),
):
    register_pass(_stage, when=_when, name=_name)(_fn)
# GBS searches clips with the weights final and before the lowering turns quantizers into integer ops.
register_pass("materialize", after="materialize_weights", when=lambda c: c.searches_clips)(search_clips)
# Diagnostics read the linear inputs with the weights final (quarot-fx outliers).
register_pass("materialize", after="materialize_weights", when=lambda c: c.observe_inputs)(observe_inputs)
# A packed KV cache: the passes see a float cache, and the lowering stores codes again.
register_pass("analysis", before="analyze_invariance")(open_packed_cache)
register_pass("lower", before="lower_to_integer_kernels")(close_packed_cache)
register_pass("lower", after="close_packed_cache")(fuse_packed_attention)
# SmoothRot reads the float graph before any rewrite and must edit the down-projection before R4.
register_pass("rotation", before="rotate_residual", when=lambda c: c.smoothrot)(smooth_down_projections)


def passes_for(config: QuaRotConfig) -> list[RegisteredPass]:
    """The passes a config runs, in order (built-ins above plus any registered from outside)."""
    return ordered_passes(config)


def run_passes(ctx: PassContext, passes: list[RegisteredPass]) -> None:
    """Run each pass, then lint the graph: a broken rewrite fails at the pass that made it."""
    ctx.report.pipeline = [p.name for p in passes]
    for entry in passes:
        start = time.perf_counter()
        entry.fn(ctx)
        ctx.gm.graph.lint()
        ctx.gm.recompile()
        ctx.report.seconds[entry.name] = time.perf_counter() - start
