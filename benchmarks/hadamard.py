"""Fast Hadamard transform vs dense matmul on CPU (issue: ≥ 5× faster at n ≥ 4096).

    python benchmarks/hadamard.py [--sizes 64 576 1536 4096 11008 14336] [--rows 2048] [--json]

Every column computes x·H/√n in float32 on the same input in one run; the ratios are what count:
the op (``quarot_fx::hadamard_transform``: the C stages, butterflies and Paley blocks, rows split
over torch's threads), the same plan as one torch GEMM per Kronecker stage (the op's path without
the C library, and its path for every prefill before the C stages took many rows), and one dense
matmul.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import median_seconds  # noqa: E402

from quarot_fx.numerics.hadamard import hadamard_matrix, hadamard_plan  # noqa: E402
from quarot_fx.kernels import hadamard_transform  # noqa: E402
from quarot_fx.kernels.hadamard_transform import hadamard_transform_cpu  # noqa: E402


def measure(n: int, rows: int, repeats: int) -> dict:
    x = torch.randn(rows, n)
    dense = hadamard_matrix(n) / math.sqrt(n)
    fast_out, dense_out = hadamard_transform(x), x @ dense
    max_err = (fast_out - dense_out).abs().max().item()
    t_fast = median_seconds(lambda: hadamard_transform(x), repeats)
    t_stages = median_seconds(lambda: hadamard_transform_cpu(x, stage_gemms=True), repeats)
    t_dense = median_seconds(lambda: x @ dense, repeats)
    return {"n": n, "rows": rows, "plan": hadamard_plan(n).describe(), "fast_ms": t_fast * 1e3,
            "stage_gemms_ms": t_stages * 1e3, "dense_ms": t_dense * 1e3, "speedup": t_dense / t_fast,
            "speedup_vs_stage_gemms": t_stages / t_fast, "max_abs_diff": max_err, "threads": torch.get_num_threads()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 576, 1536, 4096, 11008, 14336])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args(argv)
    if not args.json:
        print(f"{'n':>6} {'plan':<44} {'op ms':>8} {'stage GEMMs ms':>15} {'dense ms':>9} {'vs stages':>9} "
              f"{'vs dense':>9} {'max|diff|':>10}")
    for n in args.sizes:
        row = measure(n, args.rows, args.repeats)
        if args.json:
            print(json.dumps(row))
        else:
            # 4 significant digits: a decode row (--rows 1) takes microseconds
            print(f"{n:>6} {row['plan']:<44} {row['fast_ms']:>8.4g} {row['stage_gemms_ms']:>15.4g} "
                  f"{row['dense_ms']:>9.4g} {row['speedup_vs_stage_gemms']:>8.1f}x {row['speedup']:>8.1f}x "
                  f"{row['max_abs_diff']:>10.1e}", flush=True)


if __name__ == "__main__":
    main()
