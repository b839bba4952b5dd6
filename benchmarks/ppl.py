"""WikiText-2 perplexity of SmolLM2-135M under each quantization setting (BENCHMARK.md protocol).

    python benchmarks/ppl.py [--windows 16|all] [--configs float w8a8kv8 ...] [--lowering fx] [--json]

One row per configuration: PPL, gap to float, wall time (compile + calibration + evaluation,
one run) and the bytes of the quantized linears packed (bits/8 per weight + a float32 scale
per row or group: what the integer kernels hold at 4 bits; other widths run simulated, so for
them it is the storage they would need). ``w4a4kv4`` runs the integer kernels (the default);
``w4a4kv4-fake`` the same quantization simulated in float, to compare the two paths. GPTQ rows
calibrate on 32 windows of wiki.valid.tokens (seed 0), as BENCHMARK.md says.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quarot_fx.config import PRESETS
from quarot_fx.tools.evaluate import calibration_windows, perplexity, read_eval_text, tokenize, windows
from quarot_fx.tools.models import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
DEFAULT_TEXT = DATA / "wiki.test.raw"
DEFAULT_CALIBRATION = DATA / "wiki.valid.tokens"
CONFIGS = {
    "float": None,
    "w8a8kv8": {"preset": "w8a8kv8"},
    "w6a6kv6": {"preset": "w6a6kv6"},
    "w4a16": {"preset": "w4a16"},
    "w4a4kv4-norot": {"preset": "w4a4kv4", "rotation": "none"},
    "w4a4kv4": {"preset": "w4a4kv4"},
    "w4a4kv4-fake": {"preset": "w4a4kv4", "kernels": "fake"},
    "w4a16-gptq": {"preset": "w4a16", "weights": "gptq"},
    "w4a4kv4-gptq": {"preset": "w4a4kv4", "weights": "gptq"},
    "w4a4kv4-gptq-actorder": {"preset": "w4a4kv4", "weights": "gptq", "gptq_act_order": True},
    "w4a4kv4-g64": {"preset": "w4a4kv4", "w_group_size": 64},
    "w4a4kv4-smoothrot": {"preset": "w4a4kv4", "smoothrot": True},
    "w4a4kv4-gptq-smoothrot": {"preset": "w4a4kv4", "weights": "gptq", "smoothrot": True},
}


def needs_calibration(options) -> bool:
    return options is not None and (options.get("weights") == "gptq" or options.get("smoothrot", False))


def packed_weight_bytes(model, options) -> tuple[int, int]:
    """(bytes of the quantized linears if packed, their bytes in fp16)."""
    options = options or {"preset": "fp"}
    bits, group = PRESETS[options["preset"]]["w_bits"], options.get("w_group_size")
    packed = fp16 = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            out_f, in_f = module.weight.shape
            fp16 += 2 * out_f * in_f
            scales = out_f * (in_f // group if group else 1)
            packed += out_f * in_f * bits // 8 + (4 * scales if bits < 16 else 0)
    return packed, fp16


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--windows", default="16", help="number of 2048-token windows, or 'all'")
    parser.add_argument("--calibration", default=str(DEFAULT_CALIBRATION), help="GPTQ / SmoothRot calibration text")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--lowering", default="inductor", choices=["inductor", "fx"])
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    tokens = tokenize(tokenizer, read_eval_text(args.text))
    evaluation = windows(tokens, None if args.windows == "all" else int(args.windows))
    calibration = None
    if any(needs_calibration(CONFIGS[c]) for c in args.configs):
        text = Path(args.calibration).read_text(encoding="utf-8")
        calibration = calibration_windows(tokenize(tokenizer, text), args.calibration_windows)
    rows, reference = [], None
    for name in args.configs:
        options = CONFIGS[name]
        if needs_calibration(options):
            options = {**options, "calibration": calibration}
        torch._dynamo.reset()
        start = time.perf_counter()
        runner = model if options is None else torch.compile(
            model, backend="quarot", options={**options, "lowering": args.lowering})
        ppl = perplexity(runner, evaluation, desc=name)
        seconds = time.perf_counter() - start
        reference = ppl if name == "float" else reference
        packed, fp16 = packed_weight_bytes(model, options)
        shown = None if options is None else {k: v for k, v in options.items() if k != "calibration"}
        row = {"config": name, "options": shown, "windows": len(evaluation), "ppl": round(ppl, 3),
               "gap_pct": None if reference is None else round(100 * (ppl / reference - 1), 1),
               "seconds": round(seconds, 1), "linear_bytes_packed": packed, "linear_bytes_fp16": fp16}
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            gap = "" if row["gap_pct"] is None else f"{row['gap_pct']:+.1f}%"
            print(f"{name:<15} ppl {ppl:8.3f} {gap:>9}  {seconds:7.1f} s  linears {packed / 2**20:6.1f} MiB "
                  f"({packed / fp16:.2f}× fp16)", flush=True)
    by_name = {row["config"]: row["ppl"] for row in rows}
    for name in by_name:
        if name.endswith("-fake") and name[:-len("-fake")] in by_name and not args.json:
            integer, fake = by_name[name[:-len("-fake")]], by_name[name]
            print(f"integer kernels vs fake quantization ({name[:-len('-fake')]}): {100 * (integer / fake - 1):+.2f}% PPL")


if __name__ == "__main__":
    main()
