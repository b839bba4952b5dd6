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

from quarot_fx.report import ChannelMax, Region, Skip

from .attention import trace_rows
from .windows import run_calibration
from .down_projection import r4_rotation_for
from .matrices import multiply_right
from .graph_utils import Site, label, last_dim, op_name, origin
from .edits import ScaleInputColumns, ScaleOutputRows
from .weight_store import CHANNEL_MAX


@dataclass
class SmoothSite:
    down: Site
    up: Site
    up_start: int  # first output row of the up side in its linear (a fused gate_up has both)


def channel_max(inputs) -> torch.Tensor:
    """max over every token of every window of |x_j|, per channel (float64)."""
    return torch.stack([x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0) for x in inputs]).amax(dim=0).double()


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


def _cached_channel_maxima(ctx, sites) -> dict | None:
    """Channel maxima per down-projection node, from the weight cache when the calibration data
    and every parameter are unchanged (a sweep of α calibrates once), else by running the
    float graph; None when there is no token-id input to feed."""
    originals = ctx.lifted.originals
    if ctx.config.calibrated is not None:  # a loaded artifact: no calibration
        return {s.down.node: ctx.config.calibrated.get("channel_max", ctx.fqn_of(s.down.weight_node.target))
                for s in sites}
    state = tuple(sorted((ctx.fqn_of(attr), id(t), t._version) for attr, t in originals.items()))
    key = (CHANNEL_MAX, ctx.config.calibration_id(), hash(state))
    params = {s.down.node: ctx.weights.tensor(s.down.weight_node.target) for s in sites}
    if all(ctx.weights.has_memo(p, key) for p in params.values()):
        return {node: ctx.weights.memo(p, key, None) for node, p in params.items()}
    maxima: dict[fx.Node, torch.Tensor] = {}
    chunks = run_calibration(ctx, [s.down for s in sites],
                             lambda site, inputs: maxima.__setitem__(site.node, channel_max(inputs)),
                             "SmoothRot calibration")
    if chunks is None:
        return None
    ctx.report.counters["smoothrot_calibration_chunks"] += chunks
    for node, p in params.items():
        ctx.weights.memo(p, key, lambda node=node: maxima[node])
    return maxima


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
    maxima = _cached_channel_maxima(ctx, sites)
    if maxima is None:
        report.skipped.append(Skip("SmoothRot", "no token-id input found to feed calibration data"))
        return
    tag = f"α={config.smoothrot_alpha} calibration={config.calibration_id()}"
    scales = {}
    for site in sites:
        weight = site.down.to_logical(ctx.lifted.originals.get(site.down.weight_node.target,
                                                                getattr(ctx.gm, site.down.weight_node.target)))
        w_max = weight.detach().abs().amax(dim=0).double()
        a_max = maxima[site.down.node]
        alpha = config.smoothrot_alpha
        scale = (a_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
        scale = torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))  # dead channels stay
        scales[site.down.node] = scale
        ctx.artifact.calibrated.channel_max[ctx.fqn_of(site.down.weight_node.target)] = a_max
        signature = f"{tag} site={ctx.fqn_of(site.down.weight_node.target)}"
        ctx.edits(site.up).edits.append(ScaleOutputRows(signature, scale, site.up_start))
        ctx.edits(site.down).edits.append(ScaleInputColumns(signature, scale))
        report.regions.append(Region("SmoothRot", site.down.in_features, f"channel scales, α={alpha}",
                                     f"{label(site.down.node)}; input max {a_max.max():.3g} → "
                                     f"{(a_max / scale).max():.3g} after smoothing"))
    report.counters["smoothed_channels"] += sum(s.down.in_features for s in sites)
    if config.calibration is not None:  # the table needs a window of data (a loaded artifact has none)
        _measure_channel_max(ctx, sites, scales)


def _measure_channel_max(ctx, sites, scales) -> None:
    """The report's table: on calibration window 1, the largest |x_j| at each down-projection
    input before and after smoothing, each with and without R4 (one more forward, one window)."""
    config = ctx.config

    def visit(site, inputs):
        x = inputs[0].detach().double().reshape(-1, site.in_features)
        smoothed = x / scales[site.node]
        rotation = r4_rotation_for(config, site.in_features) if config.rotates and config.r4 else "off"

        def rotate(v):
            if isinstance(rotation, str):
                return None
            return multiply_right(torch.nn.functional.pad(v, (0, rotation.n - v.shape[-1])), rotation).abs().max().item()

        ctx.report.channel_max.append(ChannelMax(label(site.node), x.abs().max().item(), smoothed.abs().max().item(),
                                                 rotate(x), rotate(smoothed)))

    run_calibration(ctx, [s.down for s in sites], visit, "SmoothRot table", limit=1)
