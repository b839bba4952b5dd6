"""The GBS search budget: search the clips of a saved SmolLM2 row again, faster, and compare.

    python benchmarks/gbs_budget.py DIR --gbs-tokens 256 --gbs-iterations 6 --json

DIR is a row saved with ``benchmarks/ppl.py --save-dir`` that searched its clips (e.g.
``w4a4kv4-gptq-smoothrot-gbs``). Its GPTQ codes and SmoothRot statistics are restored (no
calibration of weights), its clips are dropped and searched again with the options given, on the
same calibration windows (wiki.valid, seed 0). Reported: the search's wall time, how many clips
equal the saved ones and by how much the rest moved, and the perplexity (quick protocol).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import quarot_fx
from quarot_fx.artifact import read_calibrated
from quarot_fx.tools.evaluate import calibration_windows, perplexity, read_eval_text, tokenize, windows
from quarot_fx.tools.models import load_model

from ppl import DEFAULT_CALIBRATION, DEFAULT_TEXT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--gbs-objective", choices=quarot_fx.config.GBS_OBJECTIVES, default=None)
    parser.add_argument("--gbs-tokens", type=int, default=None)
    parser.add_argument("--gbs-iterations", type=int, default=None)
    parser.add_argument("--gbs-windows", type=int, default=None)
    parser.add_argument("--windows", type=int, default=16, help="test windows for the perplexity")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--layers", type=int, default=None,
                        help="search only the first N decoder layers (to profile the search: "
                             "python -m cProfile -s tottime benchmarks/gbs_budget.py DIR --layers 2 --windows 1)")
    parser.add_argument("--recalibrate", action="store_true",
                        help="compute GPTQ and SmoothRot again instead of restoring them (with --layers: how far "
                             "the search's clips move when the weights differ by float noise)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    manifest, calibrated = read_calibrated(args.artifact)
    calibrated.clips = {}  # searched again
    saved_clips = {(site, what): clip for site, what, clip in manifest["clips"]}
    options = dict(manifest["options"])
    for key in ("gbs_objective", "gbs_tokens", "gbs_iterations", "gbs_windows"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    model, tokenizer = load_model("smollm2-135m")
    if args.layers is not None:  # a truncated model: its perplexity means nothing, its search time does
        model.model.layers = model.model.layers[:args.layers]
        model.config.num_hidden_layers = args.layers
    calibration = calibration_windows(tokenize(tokenizer, read_eval_text(DEFAULT_CALIBRATION)),
                                      args.calibration_windows)
    compiled = quarot_fx.compile(model, **options, calibration=calibration,
                                 calibrated=None if args.recalibrate else calibrated)
    test = windows(tokenize(tokenizer, read_eval_text(DEFAULT_TEXT)), args.windows)
    start = time.perf_counter()
    with quarot_fx.collect_reports() as reports, torch.no_grad():
        compiled(test[0], use_cache=False)  # the graph perplexity() runs: one search, not two
    compile_s = time.perf_counter() - start
    report = reports[0]
    clips = {(r.site, r.what): r.clip for r in report.clips}
    moved = [abs(clips[k] - c) for k, c in saved_clips.items() if k in clips]
    row = {
        "artifact": args.artifact, "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "options": {k: options.get(k) for k in ("gbs_objective", "gbs_tokens", "gbs_iterations", "gbs_windows")},
        "search_s": round(report.seconds.get("search_clips", float("nan")), 1), "compile_s": round(compile_s, 1),
        "clips": len(clips), "same_clips": sum(m == 0 for m in moved), "max_moved": round(max(moved), 4),
        "mean_moved": round(sum(moved) / len(moved), 5),
        "ppl": round(perplexity(compiled, test), 4), "saved_clips": len(saved_clips),
    }
    print(json.dumps(row) if args.json else row)


if __name__ == "__main__":
    main()
