"""Diagnostics: the largest |x| each quantized linear reads after the rewrite (``observe_inputs``).

Run on the first calibration window with the weights final, so with ``rotation="none"`` it is
the model's own activation range and with rotations on it is what a quantizer would see: the
two side by side are the outlier picture (``quarot-fx outliers``).
"""

from __future__ import annotations

from .windows import run_calibration
from .graph_utils import label


def observe_inputs(ctx) -> None:
    """Pass: ``report.input_max[site] = max |x|`` over the site's input on calibration window 1, once
    per input (q/k/v and gate/up read one: named by the first reader)."""
    first = {}
    for site in ctx.analysis.quantized:
        first.setdefault(site.input_node, site)

    def visit(site, inputs):
        ctx.report.input_max[label(site.node)] = float(inputs[0].detach().abs().max())

    run_calibration(ctx, list(first.values()), visit, "observing linear inputs", limit=1)
