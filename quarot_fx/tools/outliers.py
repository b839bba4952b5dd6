"""The outlier picture: per layer, max |x| at each quantized linear's input, before and after rotation.

Three compiles of the same model on the same tokens (rotation only, nothing quantized, the
``observe_inputs`` diagnostic): ``rotation="none"`` (the model's own activations), rotated, and
rotated with SmoothRot when asked. One panel per input kind (q/k/v, o_proj, gate/up, down_proj),
layers along x, log scale.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

import quarot_fx


def input_maxima(model, ids: torch.Tensor, smoothrot: bool = False, **options) -> dict[str, dict[str, float]]:
    """{stage: {site: max |x|}} for stages "before rotation", "rotated" (and "rotated + SmoothRot")."""
    stages = {"before rotation": {"rotation": "none"}, "rotated": {}}
    if smoothrot:
        stages["rotated + SmoothRot"] = {"smoothrot": True}
    result = {}
    for stage, extra in stages.items():
        torch._dynamo.reset()
        config = {"preset": "fp", "lowering": "fx", **options, **extra, "observe_inputs": True, "calibration": [ids]}
        compiled = torch.compile(model, backend="quarot", options=config)
        with torch.no_grad(), quarot_fx.collect_reports() as reports:
            compiled(ids)
        result[stage] = {site: value for report in reports for site, value in report.input_max.items()}
    return result


def layer_of(site: str) -> tuple[int, str] | None:
    """(layer index, module name inside it) of a site such as ``model.layers.3.mlp.down_proj``."""
    match = re.search(r"layers?\.(\d+)\.(.+)$", site)
    return (int(match.group(1)), match.group(2).rsplit(".", 1)[-1]) if match else None


def by_layer(maxima: dict[str, float]) -> dict[str, dict[int, float]]:
    """{input kind (the first linear reading it): {layer: max}}."""
    kinds: dict[str, dict[int, float]] = {}
    for site, value in maxima.items():
        if (found := layer_of(site)) is not None:
            kinds.setdefault(found[1], {})[found[0]] = value
    return kinds


def plot(maxima: dict[str, dict[str, float]], title: str, out: Path) -> Path:
    try:
        import matplotlib
    except ImportError as error:
        raise ValueError("the outlier picture needs matplotlib: pip install 'quarot-fx[bench]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = {stage: by_layer(values) for stage, values in maxima.items()}
    kinds = list(next(iter(stages.values())))
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.6), sharey=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for (stage, table), style in zip(stages.items(), ("o--", "s-", "^-")):
            layers = sorted(table.get(kind, {}))
            ax.plot(layers, [table[kind][i] for i in layers], style, markersize=3, label=stage)
        ax.set_yscale("log")
        ax.set_title(f"{kind} input")
        ax.set_xlabel("layer")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("max |x| over channels and tokens")
    axes[0][-1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
