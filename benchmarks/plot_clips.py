"""Draw the clip ratios GBS chose as a layer × input heat map (PNG), from `ppl.py --json` rows.

    python benchmarks/ppl.py --configs w4a4kv4-gptq-gbs --json > rows.jsonl
    python benchmarks/plot_clips.py rows.jsonl --config w4a4kv4-gptq-gbs -o docs/gbs_clips.png

A row's ``clips`` are [site, what, clip] triples in graph order; the site names the linear that
reads the quantized activation (or the attention module, for keys and values).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quarot_fx.tools.outliers import layer_of


def clip_table(clips) -> tuple[list[int], list[str], dict]:
    """(layers, input kinds in graph order, {(layer, kind): clip}) from [site, what, clip] triples."""
    layers, kinds, table = [], [], {}
    for site, what, clip in clips:
        layer = (layer_of(site) or (-1, ""))[0]
        kind = site.rsplit(".", 1)[-1] + " input" if what == "activation" else what
        layers += [layer] if layer not in layers else []
        kinds += [kind] if kind not in kinds else []
        table[layer, kind] = clip
    return sorted(layers), kinds, table


def plot(clips, title: str, out: Path) -> None:
    try:
        import matplotlib
    except ImportError as error:
        raise SystemExit("plot_clips needs matplotlib: pip install -e '.[bench]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers, kinds, table = clip_table(clips)
    grid = np.array([[table.get((layer, kind), np.nan) for kind in kinds] for layer in layers])
    fig, ax = plt.subplots(figsize=(1.1 * len(kinds) + 2.5, 0.28 * len(layers) + 1.6))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=np.nanmin(grid), vmax=1.0)
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="clip ratio (× max |x|)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path, help="JSON lines written by benchmarks/ppl.py --json")
    parser.add_argument("--config", help="the row to draw (default: the first with clips)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.startswith("{")]
    rows = [r for r in rows if r.get("clips") and (args.config is None or r["config"] == args.config)]
    if not rows:
        raise SystemExit(f"no row with clips{f' for --config {args.config}' if args.config else ''} in {args.rows}")
    plot(rows[0]["clips"], f"GBS clips, SmolLM2-135M {rows[0]['config']}", args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
