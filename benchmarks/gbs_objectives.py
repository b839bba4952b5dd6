"""Does GBS's local objective choose the clips its loss objective chooses?

    python benchmarks/gbs_objectives.py [--layers 4] [--length 512] [--windows 2] [--json]

The loss objective (cross-entropy of the rest of the network) costs a forward of everything after
each site per candidate clip: O(layers²) for the whole search, hours for all 30 layers of
SmolLM2 on this CPU. So the comparison runs on SmolLM2's first ``--layers`` layers (real weights,
its own head) at W4A4KV4 RTN, on calibration windows of wiki.valid.tokens: one compile per
objective, clips side by side, search time, and the perplexity each model gets on held-out
calibration windows (another seed). Never the test split.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quarot_fx import collect_reports
from quarot_fx.tools.evaluate import calibration_windows, perplexity, tokenize
from quarot_fx.tools.models import load_model

CALIBRATION = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"


def truncated(model, layers: int):
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--length", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--windows", type=int, default=2, help="calibration windows the search uses")
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    model = truncated(model, args.layers)
    tokens = tokenize(tokenizer, CALIBRATION.read_text(encoding="utf-8"))
    search = calibration_windows(tokens, args.windows, length=args.length)
    held_out = calibration_windows(tokens, args.held_out, length=args.length, seed=1)
    results = {}
    for objective in ("loss", "local", None):
        torch._dynamo.reset()
        options = {"preset": "w4a4kv4", "lowering": "fx", "calibration": search}
        if objective:
            options.update(a_clip="gbs", kv_clip="gbs", gbs_objective=objective, gbs_windows=args.windows)
        compiled = torch.compile(model, backend="quarot", options=options)
        with torch.no_grad(), collect_reports() as reports:
            compiled(search[0], use_cache=False)
        ppl = perplexity(compiled, held_out, desc=f"held-out ({objective or 'fixed clips'})")
        report = reports[0]
        results[objective or "fixed"] = {
            "clips": {f"{r.site} {r.what}": round(r.clip, 4) for r in report.clips},
            "search_seconds": round(report.seconds.get("search_clips", 0.0), 1),
            "held_out_ppl": round(ppl, 3)}
    loss, local = results["loss"]["clips"], results["local"]["clips"]
    gaps = [abs(loss[k] - local[k]) for k in loss]
    summary = {"layers": args.layers, "window_tokens": args.length, "windows": args.windows, "sites": len(loss),
               "same_clip_within_0.02": sum(g <= 0.02 for g in gaps), "mean_abs_difference": round(sum(gaps) / len(gaps), 4),
               "max_abs_difference": round(max(gaps), 4),
               **{f"{k}_search_seconds": v["search_seconds"] for k, v in results.items() if k != "fixed"},
               **{f"{k}_held_out_ppl": v["held_out_ppl"] for k, v in results.items()}}
    if args.json:
        print(json.dumps({"summary": summary, "clips": {"loss": loss, "local": local}}))
        return
    print(f"{'site':<48} {'loss':>8} {'local':>8}")
    for key in loss:
        print(f"{key:<48} {loss[key]:>8.4f} {local[key]:>8.4f}")
    for key, value in summary.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
