"""SmoothRot: scale the down-projection's input channels before R4 rotates them.

Where an MLP computes ``down(act(gate(x)) ⊙ up(x))``, the product is linear in ``up(x)``, so
dividing channel j of ``up``'s output by s_j and multiplying column j of ``down`` by s_j leaves
the function unchanged. With s_j = a_j^α / w_j^(1-α) (a_j = max over calibration tokens of
|x_j| at the down-projection input, in the float graph before any rewrite; w_j = max_i |W_down[i, j]|,
abs as in SmoothQuant; the reference code takes a signed max) the massive activations move into
the weights before the Hadamard spreads what is left (METHODS.md, arXiv 2505.03810's sibling
2506.05413).

Sites are found from the graph: a linear whose input is an elementwise product of two values,
one of which is (a row range of) another linear's output used nowhere else. A non-gated MLP
(``down(act(up(x)))``) has no such product: reported as skipped, since an activation that is
not positively homogeneous does not commute with a channel scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from quarot_fx.report import Region, Skip

from .attention import trace_rows
from .calibrate import fingerprint, run_with_observers
from .graph_utils import Site, label, last_dim, op_name, origin
from .weights import ScaleInputColumns, ScaleOutputRows


@dataclass
class SmoothSite:
    down: Site
    up: Site
    up_start: int  # first output row of the up side in its linear (a fused gate_up has both)


class ChannelMaxObserver(torch.nn.Module):
    """Identity that keeps max over tokens of |x_j| per channel in ``store[key]``."""

    def __init__(self, store: dict, key: str):
        super().__init__()
        self.store, self.key = store, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).double()
        self.store[self.key] = torch.maximum(self.store[self.key], peak) if self.key in self.store else peak
        return x


def smoothing_site(down: Site) -> SmoothSite | str:
    """The exact smoothing site feeding ``down``, or why there is none."""
    product = origin(down.input_node)
    if op_name(product) != "mul" or len(product.args) != 2 or len(product.users) != 1:
        return "its input is not an elementwise product (a non-gated MLP: the activation does not commute with a scale)"
    for operand in reversed(product.args):
        if not isinstance(operand, fx.Node) or last_dim(operand) != down.in_features:
            continue
        traced = trace_rows(operand)
        if traced is None or traced[0].kind != "linear":
            continue
        up, start = traced
        if up.node is operand and len(operand.users) != 1:
            continue  # the up output is read elsewhere too: scaling it would change that reader
        return SmoothSite(down, up, start)
    return "no operand of the product is a linear layer's output used only there"


def smooth_down_projections(ctx) -> None:
    """Pass: calibrate channel maxima on the float graph, fold s into up rows and down columns."""
    config, report = ctx.config, ctx.report
    sites = []
    for down in ctx.analysis.down_projections:
        found = smoothing_site(down)
        if isinstance(found, str):
            report.skipped.append(Skip(f"SmoothRot at {label(down.node)}", found))
        else:
            sites.append(found)
    if not sites:
        return
    maxima: dict[str, torch.Tensor] = {}
    chunks = run_with_observers(ctx, [s.down for s in sites], lambda site: ChannelMaxObserver(maxima, site.node.name),
                                "SmoothRot calibration")
    if chunks is None:
        report.skipped.append(Skip("SmoothRot", "no token-id input found to feed calibration data"))
        return
    tag = f"α={config.smoothrot_alpha} calibration={fingerprint(config.calibration)}"
    for site in sites:
        weight = site.down.to_logical(ctx.lifted.originals.get(site.down.weight_node.target,
                                                                getattr(ctx.gm, site.down.weight_node.target)))
        w_max = weight.detach().abs().amax(dim=0).double()
        a_max = maxima[site.down.node.name]
        alpha = config.smoothrot_alpha
        scale = (a_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
        scale = torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))  # dead channels stay
        signature = f"{tag} site={ctx.fqn_of(site.down.weight_node.target)}"
        ctx.edits(site.up).edits.append(ScaleOutputRows(signature, scale, site.up_start))
        ctx.edits(site.down).edits.append(ScaleInputColumns(signature, scale))
        report.regions.append(Region("SmoothRot", site.down.in_features, f"channel scales, α={alpha}",
                                     f"{label(site.down.node)}; input max {a_max.max():.3g} → "
                                     f"{(a_max / scale).max():.3g} after smoothing"))
    report.counters["smoothed_channels"] += sum(s.down.in_features for s in sites)
    report.counters["smoothrot_calibration_chunks"] += chunks
