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

from .analysis import analyze_invariance
from .attention_rotations import rotate_queries_keys, rotate_values
from .calibrate import gptq_weights
from .clip_search import search_clips
from .context import PassContext
from .down_projection import rotate_down_projections
from .fuse_linears import fuse_sibling_linears
from .head import quantize_head_int8
from .kv_cache import close_packed_cache, open_packed_cache
from .learn_rotations import learn_rotations
from .materialize import materialize_weights
from .observe import observe_inputs
from .packed_attention import fuse_packed_attention
from .lowering import lower_to_integer_kernels, lower_to_simulated_linears
from .quantize import quantize_activations, quantize_kv_cache, quantize_weights
from .registry import RegisteredPass, ordered_passes, register_pass
from .residual import rotate_residual
from .smoothrot import smooth_down_projections


# The built-in pipeline, in order. GPTQ materializes the rotations before its own weight step,
# since its Hessians come from running the rotated graph; sequential GPTQ runs after the
# activation and KV quantizers are in place.
def _gptq(config):
    return config.calibrates_weights  # GPTQ, OBR, or a Wanda mask (RTN after it)


for _stage, _fn, _when, _name in (
    ("analysis", analyze_invariance, lambda c: c.transforms, None),
    ("rotation", rotate_residual, lambda c: c.rotates and c.r1, None),
    ("rotation", rotate_values, lambda c: c.rotates and c.r2, None),
    ("rotation", rotate_queries_keys, lambda c: c.rotates and c.applies_r3, None),
    ("rotation", rotate_down_projections, lambda c: c.rotates and c.r4, None),
    ("weights", materialize_weights, lambda c: _gptq(c) and not c.learn_rotations, "materialize_rotations"),
    ("weights", gptq_weights, lambda c: _gptq(c) and not c.gptq_sequential, None),
    ("weights", quantize_weights, lambda c: c.w_bits < 16 and not c.calibrates_weights, None),
    ("activations", quantize_activations, lambda c: c.a_bits < 16, None),
    ("activations", quantize_kv_cache, lambda c: c.kv_bits < 16, None),
    # Learned rotations: with the quantizers in place and no weight materialized yet; GPTQ's
    # rotated weights are materialized after them.
    ("activations", learn_rotations, lambda c: c.learn_rotations and c.rotates, None),
    ("activations", materialize_weights, lambda c: _gptq(c) and c.learn_rotations, "materialize_learned_rotations"),
    # Sequential GPTQ sees the activations and KV cache quantized as configured.
    ("activations", gptq_weights, lambda c: _gptq(c) and c.gptq_sequential, "gptq_sequential"),
    ("materialize", materialize_weights, lambda c: c.transforms, None),
    ("lower", lower_to_integer_kernels, lambda c: c.kernels == "integer" and c.quantizes, None),
    ("lower", lower_to_simulated_linears, lambda c: c.kernels == "fake" and c.keeps_weight_codes, None),
    ("lower", quantize_head_int8, lambda c: c.int8_head, None),
):
    register_pass(_stage, when=_when, name=_name)(_fn)
# Sibling integer linears (q/k/v, gate/up) share one call once their inputs are codes.
register_pass("lower", after="lower_to_integer_kernels", when=lambda c: c.kernels == "integer" and c.quantizes)(
    fuse_sibling_linears)
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
