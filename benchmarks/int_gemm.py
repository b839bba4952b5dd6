"""A real int8 GEMM (``torch._int_mm``) against the float32 emulation, at SmolLM2-135M's shapes, on this CPU.

    python benchmarks/int_gemm.py [--repeats 5] [--json]

Both compute the same exact integer sums (checked here too); which is faster depends on the CPU
(AVX512-VNNI / AMX vs AVX2 only), so ``quantized_linear`` times them once per shape and keeps the
winner (``kernels/int_gemm.py``). This prints the ratio at full prefill and decode shapes and
what that one-time decision picks for each.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import cpu_summary, median_seconds

from quarot_fx.kernels import int_gemm
from quarot_fx.kernels.quantized_linear import integer_matmul

# rows × in → out: q/o (576→576), k/v (576→192), gate/up (576→1536), down (1536→576)
SHAPES = [(rows, k, n) for rows in (2048, 1) for k, n in ((576, 576), (576, 192), (576, 1536), (1536, 576))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps({"cpu": cpu_summary(), "threads": torch.get_num_threads()}) if args.json else
          f"{cpu_summary()}, {torch.get_num_threads()} threads")
    g = torch.Generator().manual_seed(0)
    for rows, k, n in SHAPES:
        codes = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=g)
        weight = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
        as_int, as_float = int_gemm.transposed_groups(weight, k), weight.float()
        assert torch.equal(int_gemm.int8_matmul(codes, as_int, k), integer_matmul(codes, as_float, k))
        int8 = median_seconds(lambda: int_gemm.int8_matmul(codes, as_int, k), args.repeats)
        emulated = median_seconds(lambda: integer_matmul(codes, as_float, k), args.repeats)
        row = {"shape": f"{rows}x{k}->{n}", "int8_ms": round(1000 * int8, 3), "float_ms": round(1000 * emulated, 3),
               "int8_speedup": round(emulated / int8, 2), "auto_picks": int_gemm.decide(rows, k, n, k).choice}
        print(json.dumps(row) if args.json else
              f"{row['shape']:<16} int8 {row['int8_ms']:9.3f} ms  float32 {row['float_ms']:9.3f} ms  "
              f"int8 {row['int8_speedup']:5.2f}× as fast  → auto picks {row['auto_picks']}", flush=True)


if __name__ == "__main__":
    main()
