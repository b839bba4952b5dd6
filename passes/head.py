"""The 8-bit output head (``quantize_lm_head``: ``"auto"``, the default when weights are quantized,
picks ``"w8a8"`` where activations are quantized and ``"int8"`` in weight-only configs).

The head is found as the quantization passes find it (a linear whose output reaches a graph
output: no model-specific name) and, with its final weight (rotated, norms folded), becomes
``int8_weight_linear``: int8 codes per output channel, float activations; with
``quantize_lm_head="w8a8"``, ``int8_dynamic_linear``: the same codes, and the activations rounded
to int8 per row at run time (integer sums). At decode it is the largest GEMV of the step. The
codes are computed once per weight (kept with it across recompiles) and used by both kernel
modes, so the integer and simulated paths give the same bits. ``export`` writes the head as
codes × scales in float.
"""

from __future__ import annotations

from quarot_fx.kernels.int8_linear import int8_channel_codes
from quarot_fx.report import QuantRecord

from .graph_utils import as_site, label
from .quantize import feeds_output
from .surgery import INT8_DYNAMIC_LINEAR, INT8_WEIGHT_LINEAR, drop_unused_constants, replace_with_int8_linear

INT8_HEAD = "int8 head"  # weight-store memo key: (codes, scales) of a head weight


def quantize_head_int8(ctx) -> None:
    """Pass: every output head → ``int8_weight_linear`` on its final weight."""
    for node in list(ctx.gm.graph.nodes):
        site = as_site(node)
        if site is None or site.kind == "embedding" or not feeds_output(node):
            continue
        weight = ctx.weights.tensor(site.weight_node.target)
        bias = ctx.weights.tensor(site.bias_node.target) if site.bias_node is not None else None
        codes, scale = ctx.weights.memo(weight, (INT8_HEAD, weight._version),
                                        lambda: int8_channel_codes(site.to_logical(weight.detach()).float()))
        fqn = ctx.fqn_of(site.weight_node.target)
        _record_for_export(ctx, node, site, fqn, site.from_logical(codes.float() * scale).to(weight.dtype), bias)
        dynamic = ctx.config.head_mode == "w8a8"
        replace_with_int8_linear(ctx.gm, node, site.input_node, codes, scale,
                                 bias.detach().float() if bias is not None else None,
                                 INT8_DYNAMIC_LINEAR if dynamic else INT8_WEIGHT_LINEAR)
        activations = "8-bit activations per row" if dynamic else "float activations"
        ctx.report.quantized.append(QuantRecord(fqn, "weight", 8, f"rtn, output head ({activations})",
                                                storage="int8"))
        chosen = ctx.config.quantize_lm_head
        chosen = f"{chosen!r} → {ctx.config.head_mode!r}" if chosen == "auto" else repr(chosen)
        ctx.report.notes.append(f"output head {label(node, default=fqn)}: int8 weights per channel, {activations} "
                                f"(quantize_lm_head={chosen}; False keeps it float)")
    drop_unused_constants(ctx.gm)


def _record_for_export(ctx, node, site, fqn: str, dequantized, bias) -> None:
    """``export`` writes the head as the compiled model computes it: the int8 codes times their
    scales, in float (formats' heads are float; the function is the same to rounding, except that
    with ``"w8a8"`` the exported head leaves out the rounding of its activations to int8)."""
    from quarot_fx.compiled import FinalWeight

    module = label(node, default=fqn.rpartition(".")[0])
    earlier = ctx.artifact.final_weights.get(module)
    param = ctx.lifted.originals.get(site.weight_node.target, earlier.param if earlier is not None else None)
    ctx.artifact.final_weights[module] = FinalWeight(module, site.kind, earlier.weight_fqn if earlier else fqn, param,
                                                     dequantized, bias if bias is not None else
                                                     (earlier.bias if earlier else None))
