"""A prefill's attention over the 4-bit packed KV cache: SDPA over the dequantized cache (the default,
``prefill_attention="float"``) against the ``"int8"`` kernel on each instruction-set variant this CPU runs.

    python benchmarks/attention.py [--tokens 2048] [--heads 9] [--kv-heads 3] [--dim 64] [--rounds 15] [--json]

One process, the columns interleaved round by round (this machine's timing drifts by tens of percent
between runs; only ratios within one run count). SmolLM2-135M's shape by default: 9 query heads on 3
KV heads, head size 64, causal. ``max|diff|`` is against the int8 path's reference (queries rounded
to int8, then dequantize-then-SDPA): float rounding plus what P·V's 8-bit weight codes move (the
same integer sums on every build).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_summary  # noqa: E402

from quarot_fx.kernels import int8_query_attention_reference, native, native_ops  # noqa: E402
from quarot_fx.kernels.kv_quant import kv_quantize  # noqa: E402
from quarot_fx.kernels.packed_attention import packed_attention_reference  # noqa: E402


def inputs(tokens: int, heads: int, kv_heads: int, dim: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, tokens, dim, generator=g)
    keys = kv_quantize(torch.randn(1, kv_heads, tokens, dim, generator=g) * 3, 4, 1.0)
    values = kv_quantize(torch.randn(1, kv_heads, tokens, dim, generator=g), 4, 1.0)
    return q, keys, values


def columns(q, keys, values, dim: int) -> dict:
    """name → a call of one prefill attention; the int8 kernel once per variant that builds here."""
    args = (q, *keys, *values, 4, dim, torch.float32, None, None, True, True)
    found = {"SDPA over the dequantized cache": lambda: packed_attention_reference(*args)}
    pool = native_ops.load()  # every variant's threads on torch's pool, as in a compiled model
    for name, _, _ in native.VARIANTS:
        lib = native.load_variant(name) if native.cpu_supports(name) else None
        if lib is not None and pool:  # (threads of its own would share the cores with SDPA's spinning ones)
            lib.set_job_runner(torch.ops.quarot_fx._native_pool_runner())
        if lib is not None and lib.gemm_available():
            def call(lib=lib):
                real = native.library
                native.library = lambda: lib
                try:
                    return native.int8_query_attention(q, keys, values, dim ** -0.5, True)
                finally:
                    native.library = real
            found[f"int8 kernel, {name}"] = call
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", action="store_true", help="one JSON object per column")
    args = parser.parse_args(argv)
    q, keys, values = inputs(args.tokens, args.heads, args.kv_heads, args.dim)
    calls = columns(q, keys, values, args.dim)
    expected = int8_query_attention_reference(q, *keys, *values, 4, args.dim, torch.float32, None, None, True, True)
    times, diffs = {name: [] for name in calls}, {}
    for name, call in calls.items():  # warm-up, and the outputs
        diffs[name] = (call() - expected).abs().max().item()
    for _ in range(args.rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    baseline = statistics.median(times["SDPA over the dequantized cache"])
    if not args.json:
        print(f"{cpu_summary()}, {torch.get_num_threads()} threads; {args.heads} heads on {args.kv_heads} KV heads, "
              f"{args.tokens} causal rows, head size {args.dim}")
        print(f"{'column':<34} {'median ms':>10} {'min ms':>8} {'× SDPA':>7} {'max|diff| vs int8 reference':>28}")
    for name, seconds in times.items():
        row = {"column": name, "median_ms": statistics.median(seconds) * 1e3, "min_ms": min(seconds) * 1e3,
               "speed_x_sdpa": baseline / statistics.median(seconds), "max_abs_diff": diffs[name],
               "threads": torch.get_num_threads(), "tokens": args.tokens}
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{name:<34} {row['median_ms']:>10.2f} {row['min_ms']:>8.2f} {row['speed_x_sdpa']:>6.2f}x "
                  f"{row['max_abs_diff']:>28.1e}", flush=True)


if __name__ == "__main__":
    main()
