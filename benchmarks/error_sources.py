"""Where a saved 4-bit row loses its perplexity: the row as saved, then with each quantizer
family left in float (KV cache, activations), its calibration restored, nothing re-searched.

    python benchmarks/error_sources.py DIR --json

DIR is a row saved with ``benchmarks/ppl.py --save-dir`` (e.g. ``w4a4kv4-gptq-smoothrot-gbs``).
Its GPTQ codes, SmoothRot maxima and clips are restored, so every variant differs from the row
only by the quantizers it switches off (the weights stay the saved 4-bit codes).
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

import quarot_fx
from quarot_fx.artifact import read_calibrated
from quarot_fx.tools.evaluate import calibration_windows, perplexity, read_eval_text, tokenize, windows
from quarot_fx.tools.models import load_model

from ppl import DEFAULT_CALIBRATION, DEFAULT_TEXT

VARIANTS = {
    "as saved": {},
    "KV cache in float": {"kv_bits": 16, "kv_clip": None},
    "activations in float": {"a_bits": 16, "a_clip": None},
    "activations and KV cache in float": {"a_bits": 16, "a_clip": None, "kv_bits": 16, "kv_clip": None},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--windows", type=int, default=16, help="test windows for the perplexity")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    manifest, _ = read_calibrated(args.artifact)
    model, tokenizer = load_model("smollm2-135m")
    calibration = calibration_windows(tokenize(tokenizer, read_eval_text(DEFAULT_CALIBRATION)),
                                      args.calibration_windows)
    test = windows(tokenize(tokenizer, read_eval_text(DEFAULT_TEXT)), args.windows)
    for name in args.variants:
        calibrated = read_calibrated(args.artifact)[1]  # a fresh copy per variant
        options = {**manifest["options"], **VARIANTS[name]}
        torch._dynamo.reset()
        compiled = quarot_fx.compile(model, **options, calibration=calibration, calibrated=calibrated)
        row = {"artifact": args.artifact, "variant": name, "cpu": platform.processor() or platform.machine(),
               "windows": args.windows, "ppl": round(perplexity(compiled, test), 4)}
        print(json.dumps(row) if args.json else row, flush=True)


if __name__ == "__main__":
    main()
