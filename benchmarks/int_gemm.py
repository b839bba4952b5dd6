"""The CPU's exact integer GEMMs at SmolLM2-135M's shapes: a real int8 GEMM (``torch._int_mm``),
the float32 emulation and the C int4 kernels (the blocked GEMM at prefill, the GEMV at decode).

    python benchmarks/int_gemm.py [--repeats 3] [--rows 2048 1] [--json]

All compute the same exact integer sums (checked here too); which is fastest depends on the CPU
(AVX512-VNNI / AMX vs AVX2 only), so ``quantized_linear`` times them once per shape and keeps the
winner (``kernels/int_gemm.py``). The timings are that decision's own (``int_gemm.measure``: at
decode, cycling through copies of the weight that together exceed the last-level cache, as a
model's layers each read their own weights). This prints them at full prefill and decode shapes
(each GEMM alone, at the shape's own rows) and what the decision picks for the default
``resident_weights="packed"`` (it adds the per-call unpacking to the GEMMs on unpacked codes).
The C kernels run on torch's thread pool, as in a compiled model (``native_ops.load`` hands them
its runner).
"""

from __future__ import annotations

import argparse
import json

import torch
from common import cpu_summary

from quarot_fx.kernels import int_gemm, native, native_ops
from quarot_fx.kernels.gemm import int8_matmul, transposed_groups
from quarot_fx.kernels.quantized_linear import integer_matmul, pack_linear_weight

# in → out: q/o (576→576), k/v (576→192), gate/up (576→1536), down (1536→576)
WIDTHS = ((576, 576), (576, 192), (576, 1536), (1536, 576))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, nargs="+", default=[2048, 1],
                        help="activation rows of each GEMM: a 2048-token prefill and a decode step by default")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    native_ops.load()  # the C kernels' threads: torch's pool, as in a compiled model
    print(json.dumps({"cpu": cpu_summary(), "threads": torch.get_num_threads(),
                      "int4_kernels": native.unavailable_reason() or "built"}) if args.json else
          f"{cpu_summary()}, {torch.get_num_threads()} threads; int4 kernels: {native.unavailable_reason() or 'built'}")
    g = torch.Generator().manual_seed(0)
    for rows, k, n in [(rows, k, n) for rows in args.rows for k, n in WIDTHS]:
        codes = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=g)
        weight = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
        exact = integer_matmul(codes, weight.float(), k)
        assert torch.equal(int8_matmul(codes, transposed_groups(weight, k), k), exact)
        int4 = native.applies(rows, k, k) and native.library() is not None
        if int4:
            ones = torch.ones(rows, 1)
            assert torch.equal(native.int4_linear(codes, ones, pack_linear_weight(weight), torch.ones(n, 1), None, k),
                               exact)
        ms = int_gemm.measure(rows, k, n, k, ("int8", "float") + ("int4",) * int4, args.repeats, probe_rows=rows)
        row = {"shape": f"{rows}x{k}->{n}", **{f"{c}_ms": round(v, 4) for c, v in ms.items()},
               **{f"{c}_vs_float": round(ms["float"] / v, 2) for c, v in ms.items() if c != "float"},
               "auto_picks": int_gemm.decide(rows, k, n, k, unpacks=True).choice}
        print(json.dumps(row) if args.json else
              f"{row['shape']:<16} " + "  ".join(f"{c} {v:9.4f} ms" for c, v in ms.items()) + "  "
              + "  ".join(f"{c} {ms['float'] / v:5.2f}× float" for c, v in ms.items() if c != "float")
              + f"  → auto picks {row['auto_picks']}", flush=True)


if __name__ == "__main__":
    main()
