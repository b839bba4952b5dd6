"""Do GBS's faster objectives (local, fisher) choose the clips its loss objective chooses?

    python benchmarks/gbs_objectives.py [--layers 2] [--length 512] [--windows 2] [--json]

The loss objective (cross-entropy of the rest of the network) costs a forward of everything after
each site per candidate clip: O(layers²) for the whole search, hours for all 30 layers of
SmolLM2 on this CPU. So the comparison searches only the sites of the first ``--layers`` decoder
layers of the whole model (real weights, W4A4KV4 RTN; later sites keep the fixed default clips,
the same for every objective), on calibration windows of wiki.valid.tokens: one compile per
objective, clips side by side, search time, and the perplexity each model gets on held-out
calibration windows (another seed). Never the test split.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import time
from pathlib import Path

import torch

from quarot_fx import collect_reports
from quarot_fx.passes import clip_search
from quarot_fx.tools.evaluate import calibration_windows, perplexity, tokenize
from quarot_fx.tools.models import load_model

FASTER = ("local", "fisher")
CALIBRATION = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"


@contextlib.contextmanager
def searching_first_layers(layers: int):
    """Only the quantizers of decoder layers < ``layers`` are searched; the rest keep their clip."""
    real = clip_search.searched_quantizers

    def first(gm, config):
        return [q for q in real(gm, config)
                if int(re.search(r"layers\.(\d+)\.", clip_search._site_of(q)[0]).group(1)) < layers]

    clip_search.searched_quantizers = first
    try:
        yield
    finally:
        clip_search.searched_quantizers = real


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers whose sites are searched")
    parser.add_argument("--length", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--windows", type=int, default=2, help="calibration windows the search uses")
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    tokens = tokenize(tokenizer, CALIBRATION.read_text(encoding="utf-8"))
    search = calibration_windows(tokens, args.windows, length=args.length)
    held_out = calibration_windows(tokens, args.held_out, length=args.length, seed=1)
    results = {}
    for objective in ("loss", *FASTER, None):
        torch._dynamo.reset()
        options = {"preset": "w4a4kv4", "lowering": "fx", "calibration": search}
        if objective:
            options.update(a_clip="gbs", kv_clip="gbs", gbs_objective=objective, gbs_windows=args.windows)
        compiled = torch.compile(model, backend="quarot", options=options)
        with torch.no_grad(), collect_reports() as reports, searching_first_layers(args.layers):
            compiled(search[0], use_cache=False)
        ppl = perplexity(compiled, held_out, desc=f"held-out ({objective or 'fixed clips'})")
        report = reports[0]
        results[objective or "fixed"] = {
            "clips": {f"{r.site} {r.what}": round(r.clip, 4) for r in report.clips},
            "search_seconds": round(report.seconds.get("search_clips", 0.0), 1),
            "held_out_ppl": round(ppl, 3)}
    loss = results["loss"]["clips"]
    summary = {"layers": args.layers, "window_tokens": args.length, "windows": args.windows, "sites": len(loss)}
    for objective in FASTER:
        gaps = [abs(loss[k] - results[objective]["clips"][k]) for k in loss]
        summary[objective] = {"same_clip_within_0.02": sum(g <= 0.02 for g in gaps),
                              "mean_abs_difference": round(sum(gaps) / len(gaps), 4),
                              "max_abs_difference": round(max(gaps), 4)}
    summary.update({f"{k}_search_seconds": v["search_seconds"] for k, v in results.items() if k != "fixed"})
    summary.update({f"{k}_held_out_ppl": v["held_out_ppl"] for k, v in results.items()})
    clips = {k: v["clips"] for k, v in results.items() if k != "fixed"}
    if args.json:
        print(json.dumps({"summary": summary, "clips": clips}))
        return
    print(f"{'site':<48} " + " ".join(f"{k:>8}" for k in clips))
    for key in loss:
        print(f"{key:<48} " + " ".join(f"{c[key]:>8.4f}" for c in clips.values()))
    for key, value in summary.items():
        print(f"{key}: {value}")

if __name__ == "__main__":
    main()
