"""WikiText-2 perplexity of SmolLM2-135M under each quantization setting (BENCHMARK.md protocol).

    python benchmarks/ppl.py [--windows 16|all] [--configs float w8a8kv8 ...] [--lowering fx] [--json]
    python benchmarks/ppl.py --sweep smoothrot_alpha [--values 0.3 0.4 0.5 0.6 0.7]
    python benchmarks/ppl.py --configs w4a4kv4 w4a4kv4-learned --validation-windows 4
    python benchmarks/ppl.py --configs kv4 kv4-int8-attention --kv-cache

One row per configuration: PPL, gap to float, wall time (compile + calibration + evaluation,
one run) and the bytes of the quantized linears packed (bits/8 per weight + a float32 scale
per row or group: what the integer kernels hold at 4 bits; other widths run simulated, so for
them it is the storage they would need). ``w4a4kv4`` runs the integer kernels (the default);
``w4a4kv4-fake`` the same quantization simulated in float, to compare the two paths.
``--kv-cache`` runs every window as a prefill into a fresh KV cache (a quarot model's packed
cache, generation's path) instead of a cache-free forward: where ``prefill_attention`` applies
(``*-int8-attention`` rows change nothing without it). GPTQ rows
calibrate on 32 windows of wiki.valid.tokens (seed 0), as BENCHMARK.md says.

``--sweep OPTION`` compiles the sweep's base configuration once per value and picks the value
with the lowest perplexity on held-out *calibration* windows (wiki.valid, another seed); the
test perplexity of every value is printed next to it but never used to choose.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

import quarot_fx
from quarot_fx import collect_reports
from quarot_fx.config import QuaRotConfig
from quarot_fx.passes.residual import expanded_width
from quarot_fx.tools.evaluate import (calibration_windows, perplexity, read_eval_text, tokenize, unseen_windows,
                                     windows)
from quarot_fx.tools.models import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
DEFAULT_TEXT = DATA / "wiki.test.raw"
DEFAULT_CALIBRATION = DATA / "wiki.valid.tokens"
GBS = {"a_clip": "gbs", "kv_clip": "gbs", "gbs_objective": "local"}
CONFIGS = {
    "float": None,
    "w8a8kv8": {"preset": "w8a8kv8"},
    "w8a8kv8-float-head": {"preset": "w8a8kv8", "quantize_lm_head": False},
    "w8a8kv8-w8a8-head": {"preset": "w8a8kv8", "quantize_lm_head": "w8a8"},  # = the default ("auto")
    "w8a8kv8-int8-head": {"preset": "w8a8kv8", "quantize_lm_head": "int8"},  # the default before the 19th session
    "w6a6kv6": {"preset": "w6a6kv6"},
    "w4a16": {"preset": "w4a16"},
    "w4a4kv4-norot": {"preset": "w4a4kv4", "rotation": "none"},
    "w4a4kv4": {"preset": "w4a4kv4"},
    "w4a4kv4-float-head": {"preset": "w4a4kv4", "quantize_lm_head": False},
    "w4a4kv4-w8a8-head": {"preset": "w4a4kv4", "quantize_lm_head": "w8a8"},  # = the default ("auto")
    "w4a4kv4-int8-head": {"preset": "w4a4kv4", "quantize_lm_head": "int8"},
    "w4a4kv4-int8-attention": {"preset": "w4a4kv4", "prefill_attention": "int8"},  # needs --kv-cache to matter
    # the KV cache alone at 4 bits, with float and with int8-query prefill attention: what the option costs by itself
    "kv4": {"w_bits": 16, "a_bits": 16, "kv_bits": 4},
    "kv4-int8-attention": {"w_bits": 16, "a_bits": 16, "kv_bits": 4, "prefill_attention": "int8"},
    "w4a4kv4-fake": {"preset": "w4a4kv4", "kernels": "fake"},
    "w4a16-gptq": {"preset": "w4a16", "weights": "gptq"},
    "w4a4kv4-gptq": {"preset": "w4a4kv4", "weights": "gptq"},
    "w4a4kv4-gptq-onepass": {"preset": "w4a4kv4", "weights": "gptq", "gptq_sequential": False},
    "w4a4kv4-gptq-actorder": {"preset": "w4a4kv4", "weights": "gptq", "gptq_act_order": True},
    "w4a4kv4-g64": {"preset": "w4a4kv4", "w_group_size": 64},
    "w4a4kv4-smoothrot": {"preset": "w4a4kv4", "smoothrot": True},
    "w4a4kv4-gptq-smoothrot": {"preset": "w4a4kv4", "weights": "gptq", "smoothrot": True},
    "w4a4kv4-gptq-smoothrot-onepass": {"preset": "w4a4kv4", "weights": "gptq", "smoothrot": True,
                                       "gptq_sequential": False},
    # GSR (R1 only) where its paper claims the gain: 2- and 3-bit GPTQ weights, groups of 64.
    **{f"w{bits}a16-gptq-g64{suffix}": {"w_bits": bits, "a_bits": 16, "kv_bits": 16, "weights": "gptq",
                                         "w_group_size": 64, **extra}
       for bits in (2, 3) for suffix, extra in (("", {}), ("-gsr", {"rotation": "gsr", "gsr_group_size": 64}),
                                                ("-blockhad", {"rotation": "gsr", "gsr_group_size": 64,
                                                               "gsr_permutation": "none"}))},
    "w4a4kv4-gptq-gsr": {"preset": "w4a4kv4", "weights": "gptq", "rotation": "gsr"},
    # GBS clip search (the local objective: the loss objective is hours on this CPU, see README).
    "w4a4kv4-gptq-gbs": {"preset": "w4a4kv4", "weights": "gptq", **GBS},
    "w4a4kv4-gptq-smoothrot-gbs": {"preset": "w4a4kv4", "weights": "gptq", "smoothrot": True, **GBS},
    "w3a3kv3": {"preset": "w3a3kv3"},
    "w3a3kv3-gptq": {"preset": "w3a3kv3", "weights": "gptq"},
    "w3a3kv3-gptq-gbs": {"preset": "w3a3kv3", "weights": "gptq", **GBS},
    "w3a3kv3-gptq-smoothrot-gbs": {"preset": "w3a3kv3", "weights": "gptq", "smoothrot": True, **GBS},
    # OBR vs its baselines at 50 % sparsity (Wanda mask for all three), stored compressed.
    **{f"w4a4kv4-{tag}-{method}": {"preset": "w4a4kv4", "weights": method, **pattern}
       for tag, pattern in (("s50", {"sparsity": 0.5}), ("24", {"sparsity_pattern": "2:4"}))
       for method in ("rtn", "gptq", "obr")},
    # Learned rotations (R1, R2 by Cayley SGD on the quantized loss; 100 steps on 8 × 512 tokens).
    "w4a4kv4-learned": {"preset": "w4a4kv4", "learn_rotations": True},
    "w4a4kv4-gptq-learned": {"preset": "w4a4kv4", "weights": "gptq", "learn_rotations": True},
    "w4a4kv4-gptq-smoothrot-gbs-learned": {"preset": "w4a4kv4", "weights": "gptq", "smoothrot": True, **GBS,
                                           "learn_rotations": True},
    # Dimension expansion: R1 at width 576 + k (rounded up to a constructible Hadamard order).
    **{f"w3a3kv3-gptq-gbs-expand{k}": {"preset": "w3a3kv3", "weights": "gptq", "expand": k, **GBS}
       for k in (64, 192)},
}
SWEEPS = {"smoothrot_alpha": ("w4a4kv4-smoothrot", (0.3, 0.4, 0.5, 0.6, 0.7))}


def needs_calibration(options) -> bool:
    return options is not None and (options.get("weights") in ("gptq", "obr") or options.get("smoothrot", False)
                                    or options.get("learn_rotations", False)
                                    or "gbs" in (options.get("a_clip"), options.get("kv_clip"))
                                    or bool(options.get("sparsity")) or "sparsity_pattern" in options)


def config_of(options) -> QuaRotConfig:
    """The configuration's shape (bits, groups, width) without what needs calibration."""
    calibrated_only = ("a_clip", "kv_clip", "sparsity", "sparsity_pattern", "learn_rotations")  # the shape is the dense one
    options = {k: v for k, v in (options or {"preset": "fp"}).items() if k not in calibrated_only}
    return QuaRotConfig.from_options({**options, "calibration": None, "weights": "rtn", "smoothrot": False})


def residual_width(model, options) -> tuple[int, int]:
    """(hidden size, the width R1 rotates at: larger under dimension expansion)."""
    hidden = model.config.hidden_size
    return hidden, expanded_width(config_of(options), hidden) if options else hidden


def packed_weight_bytes(model, options) -> tuple[int, int]:
    """(bytes of the quantized linears if packed, their bytes in fp16), at the rotated width: an
    expanded residual stream widens every linear that reads or writes it."""
    config = config_of(options)
    bits, group = config.w_bits, config.w_group_size
    hidden, width = residual_width(model, options)
    packed = fp16 = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            out_f, in_f = (width if n == hidden else n for n in module.weight.shape)
            fp16 += 2 * out_f * in_f
            scales = out_f * (in_f // group if group else 1)
            packed += out_f * in_f * bits // 8 + (4 * scales if bits < 16 else 0)
    return packed, fp16


def expansion_cost(model, options) -> dict | None:
    """What dimension expansion adds: linear multiply-adds per token (lm_head included) and
    weight elements (the embedding table too), as ratios to the unexpanded model."""
    hidden, width = residual_width(model, options)
    if width == hidden:
        return None
    grown = lambda shape: torch.Size(width if n == hidden else n for n in shape).numel()
    linears = [m.weight.shape for m in model.modules() if isinstance(m, torch.nn.Linear)]
    tables = [m.weight.shape for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    flops = sum(map(grown, linears)) / sum(s.numel() for s in linears)
    params = sum(map(grown, linears + tables)) / sum(s.numel() for s in linears + tables)
    return {"width": width, "extra_dims": width - hidden, "linear_macs_ratio": round(flops, 3),
            "weight_elements_ratio": round(params, 3)}


def measure(model, name, options, evaluation, lowering, reference, held_out=None, save_dir=None,
            validation=None, use_cache=False) -> dict:
    """One row: compile (+ calibrate), then perplexity on the evaluation windows (if any), on
    ``held_out`` calibration windows (a sweep's choice) and on ``validation`` windows of the
    calibration split that no calibration window touches; saved under ``save_dir`` if given
    (``quarot-fx eval DIR`` then re-evaluates it in another process without calibrating).
    ``use_cache``: every window a prefill into a fresh KV cache (``--kv-cache``)."""
    packed, fp16 = packed_weight_bytes(model, options)  # first: a mistake here must not cost a calibrated row
    cost = expansion_cost(model, options)
    torch._dynamo.reset()
    start = time.perf_counter()
    if options is None:
        runner = model
    elif options.get("learn_rotations"):  # dynamic shapes: learning runs 512-token windows (learn_tokens)
        runner = quarot_fx.compile(model, **options, lowering=lowering)
    else:
        runner = torch.compile(model, backend="quarot", options={**options, "lowering": lowering})
    row = {"config": name, "options": None if options is None else {k: v for k, v in options.items() if k != "calibration"}}
    with collect_reports() as reports:
        score = functools.partial(perplexity, runner, use_cache=use_cache)
        if held_out is not None:
            row["calibration_ppl"] = round(score(held_out, desc=f"{name} (held-out calibration)"), 3)
        if validation:
            row["validation_ppl"] = round(score(validation, desc=f"{name} (unseen validation)"), 3)
        ppl = score(evaluation, desc=name) if evaluation else None
    row.update({"windows": len(evaluation), "ppl": None if ppl is None else round(ppl, 3),
                "gap_pct": None if reference is None or ppl is None else round(100 * (ppl / reference - 1), 1),
                "seconds": round(time.perf_counter() - start, 1), "linear_bytes_packed": packed,
                "linear_bytes_fp16": fp16})
    if save_dir is not None and options is not None:
        try:  # the row's figures matter more than the artifact: report a failed save, keep the row
            row["saved"] = str(quarot_fx.save(runner, Path(save_dir) / name, source="smollm2-135m"))
        except ValueError as error:
            row["saved"] = f"failed: {error}"
    if cost is not None:
        row["expansion"] = cost
    if reports:  # where the time went: passes over a second (calibration, GPTQ, clip search)
        row["pass_seconds"] = {k: round(v, 1) for k, v in reports[0].seconds.items() if v >= 1}
        counters = reports[0].counters
        if counters["packed_bytes"]:  # what the integer kernels really hold (sparse: compressed)
            row["stored_linear_bytes"] = counters["packed_bytes"]
        if counters["sparse_weights"]:  # counted from the stored weights
            row["sparsity"] = round(counters["sparse_zeros"] / counters["sparse_weights"], 4)
            row["sparse_pattern_violations"] = counters["sparse_pattern_violations"]
        if reports[0].clips:  # what GBS chose (benchmarks/plot_clips.py draws it)
            row["clips"] = [[c.site, c.what, c.clip] for c in reports[0].clips]
    return row


def show(row, as_json: bool) -> None:
    if as_json:
        print(json.dumps(row), flush=True)
        return
    gap = "" if row["gap_pct"] is None else f"{row['gap_pct']:+.1f}%"
    extra = f"  calibration ppl {row['calibration_ppl']:.3f}" if "calibration_ppl" in row else ""
    extra += f"  unseen validation ppl {row['validation_ppl']:.3f}" if "validation_ppl" in row else ""
    if "learn_rotations" in row.get("pass_seconds", {}):
        extra += f"  learning {row['pass_seconds']['learn_rotations']:.0f} s"
    test = "       -" if row["ppl"] is None else f"{row['ppl']:8.3f}"
    if "expansion" in row:
        cost = row["expansion"]
        extra += (f"  width {cost['width']}: {cost['linear_macs_ratio']:.2f}× linear MACs, "
                  f"{cost['weight_elements_ratio']:.2f}× weights")
    print(f"{row['config']:<28} ppl {test} {gap:>9}  {row['seconds']:7.1f} s  linears "
          f"{row['linear_bytes_packed'] / 2**20:6.1f} MiB ({row['linear_bytes_packed'] / row['linear_bytes_fp16']:.2f}× fp16)"
          f"{extra}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--windows", default="16", help="number of 2048-token windows, or 'all'")
    parser.add_argument("--calibration", default=str(DEFAULT_CALIBRATION), help="GPTQ / SmoothRot calibration text")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--sweep", choices=list(SWEEPS), help="sweep one option of its base configuration")
    parser.add_argument("--values", nargs="+", type=float, help="the sweep's values (default: see SWEEPS)")
    parser.add_argument("--held-out-windows", type=int, default=4,
                        help="calibration-text windows (seed 1) that choose the sweep's value")
    parser.add_argument("--test-every-value", action="store_true",
                        help="sweep: test perplexity of every value (default: of the chosen one only)")
    parser.add_argument("--validation-windows", type=int, default=0,
                        help="also measure every row on this many 2048-token windows of the calibration split that "
                             "share no token with the calibration windows (text learning and calibration never saw)")
    parser.add_argument("--lowering", default="inductor", choices=["inductor", "fx"])
    parser.add_argument("--kv-cache", action="store_true",
                        help="every window is a prefill into a fresh KV cache (use_cache=True: quarot's packed "
                             "cache, the path generation takes, where prefill_attention applies)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.add_argument("--save-dir", help="save each quantized row there (quarot_fx.save), one directory per row")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    tokens = tokenize(tokenizer, read_eval_text(args.text))
    evaluation = windows(tokens, None if args.windows == "all" else int(args.windows))
    names = [SWEEPS[args.sweep][0]] if args.sweep else args.configs
    calibration_tokens = None
    if args.sweep or any(needs_calibration(CONFIGS[c]) for c in names):
        calibration_tokens = tokenize(tokenizer, Path(args.calibration).read_text(encoding="utf-8"))
    calibration = None if calibration_tokens is None else calibration_windows(calibration_tokens, args.calibration_windows)
    validation = None
    if args.validation_windows:
        calibration_tokens = calibration_tokens if calibration_tokens is not None else tokenize(
            tokenizer, Path(args.calibration).read_text(encoding="utf-8"))
        validation = unseen_windows(calibration_tokens, args.validation_windows, args.calibration_windows)

    def options_of(name, **extra):
        options = CONFIGS[name]
        return options if not needs_calibration(options) else {**options, **extra, "calibration": calibration}

    if args.sweep:
        base, default_values = SWEEPS[args.sweep]
        held_out = calibration_windows(calibration_tokens, args.held_out_windows, seed=1)
        reference = measure(model, "float", None, evaluation, args.lowering, None, held_out)
        show(reference, args.json)
        rows = []
        for value in args.values or default_values:
            rows.append(measure(model, f"{base} {args.sweep}={value}", options_of(base, **{args.sweep: value}),
                                evaluation if args.test_every_value else [], args.lowering, reference["ppl"], held_out))
            show(rows[-1], args.json)
        best = min(rows, key=lambda row: row["calibration_ppl"])
        value = best["options"][args.sweep]
        if best["ppl"] is None:  # the chosen value on the test windows, now that it is chosen
            best = measure(model, f"{base} {args.sweep}={value}", options_of(base, **{args.sweep: value}), evaluation,
                           args.lowering, reference["ppl"])
            show(best, args.json)
        choice = {"sweep": args.sweep, "chosen": value, "by": "held-out calibration ppl", "test_ppl": best["ppl"],
                  "test_gap_pct": best["gap_pct"]}
        print(json.dumps(choice) if args.json else f"chosen {args.sweep}={value} (lowest held-out calibration ppl); "
              f"its test ppl {best['ppl']} ({best['gap_pct']:+.1f}%)", flush=True)
        return
    rows, reference = [], None
    for name in names:
        row = measure(model, name, options_of(name), evaluation, args.lowering, reference, save_dir=args.save_dir,
                      validation=validation, use_cache=args.kv_cache)
        reference = row["ppl"] if name == "float" else reference
        rows.append(row)
        show(row, args.json)
    by_name = {row["config"]: row["ppl"] for row in rows}
    for name in by_name:
        if name.endswith("-fake") and name[:-len("-fake")] in by_name and not args.json:
            integer, fake = by_name[name[:-len("-fake")]], by_name[name]
            print(f"integer kernels vs fake quantization ({name[:-len('-fake')]}): {100 * (integer / fake - 1):+.2f}% PPL")


if __name__ == "__main__":
    main()
