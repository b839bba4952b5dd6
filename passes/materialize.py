"""Materialization: every edited weight computed once and its site pointed at it.

Between the passes that record edits (rotations, SmoothRot, quantizers) and the lowerings: the
float weights are computed through ``ctx.weights`` and become the graph's constants; a 4-bit
weight that the lowering keeps as codes stays pending in ``ctx.lowering``; the report gets each
weight's final form (for ``export``) and each linear's offline and online transforms.
"""

from __future__ import annotations

from quarot_fx.numerics.quant import quantize_activation

from .edits import Pending, SiteEdits, quantizes_last, weight_record
from .graph_utils import label
from .sparsity import prunes, record_sparsity
from .surgery import drop_unused_constants, replace_site_weights


def keeps_codes(ctx, entry) -> bool:
    """The site's 4-bit weight stays codes and scales until the lowering: packed for the integer
    kernels; for the fake path's simulated linear only where its input is quantized."""
    if not ctx.config.keeps_weight_codes or entry.site.kind == "embedding":
        return False
    source = entry.site.input_node
    return ctx.config.kernels == "integer" or (source.op == "call_function" and source.target is quantize_activation)



def materialize_weights(ctx) -> None:
    """Compute every edited weight once (cached by parameter) and point its site at it.

    A 4-bit weight quantization that the lowering keeps as codes stays pending: ``ctx.lowering``
    maps the site's node to it and ``lower_to_integer_kernels`` packs it (or
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
            ctx.lowering[entry.site.node] = Pending(entry, record)
            continue
        weight, bias = ctx.weights.float(entry)
        codes = ctx.weights.codes(entry) if record is not None else None
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


def record_final_weight(ctx, module: str, entry: SiteEdits, weight=None, bias=None, codes=None) -> None:
    """Record the site's :class:`FinalWeight` in the report (bits and group from its quantizing
    edit, if any); a later phase's record of the same op replaces the earlier one."""
    from quarot_fx.compiled import FinalWeight

    last = entry.edits[-1] if quantizes_last(entry) else None
    earlier = ctx.artifact.final_weights.get(module)
    param = ctx.lifted.originals.get(entry.original_weight, earlier.param if earlier is not None else None)
    ctx.artifact.final_weights[module] = FinalWeight(
        module, entry.site.kind, ctx.fqn_of(entry.original_weight), param, weight, bias, getattr(last, "bits", None),
        getattr(last, "group_size", None), codes if last is not None else None, ctx.weights.offline_codes(entry))
