"""Which exact integer GEMM the CPU runs for ``quantized_linear``: a real int8 GEMM or float32 emulation.

Both compute Σ_k qx·qw exactly: ``torch._int_mm`` accumulates in int32 (exact while K·128·8 < 2³¹),
the emulation multiplies integer-valued float32 tensors (exact while the sum stays below 2²⁴,
float64 beyond, see ``accumulator_dtype``). The int32 sums convert to the same floats, so the
two paths give the same output bit for bit and the choice is purely one of speed.

Which is faster depends on the CPU: with AVX512-VNNI or AMX, oneDNN's int8 GEMM beats an fp32
matmul several times; with only AVX2 it was measured 15-50× *slower*. So nothing is hard-coded:
on first use of a shape (rows bucketed to powers of two, capped at ``PROBE_ROWS``) both paths
are timed once on that shape and the faster one is kept for the rest of the process.

Policy, strongest first: the compile option ``int_gemm`` ("int8" | "float"), the environment
variable ``QUAROT_FX_INT_GEMM`` (same values), else "auto" (the measurement).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from quarot_fx.config import GEMM_POLICIES as POLICIES
ENVIRONMENT = "QUAROT_FX_INT_GEMM"
PROBE_ROWS = 128  # beyond this many rows the relative speed of the two GEMMs no longer moves much
INT32_LIMIT = 2**31


@dataclass(frozen=True)
class Decision:
    """The GEMM chosen for one (rows bucket, in, out, group) shape, and what was measured."""

    rows: int
    in_features: int
    out_features: int
    group: int
    choice: str  # "int8" | "float"
    by: str  # "measured" | "option" | "environment" | "range" (int32 could overflow)
    int8_ms: float | None = None
    float_ms: float | None = None


_decisions: dict[tuple[int, int, int, int, str], Decision] = {}


def check_policy(name: str, value: str) -> str:
    if value not in POLICIES:
        raise ValueError(f"{name}={value!r} is not a GEMM policy; choose one of {', '.join(POLICIES)}")
    return value


def cpu_flags() -> list[str]:
    """The CPU features that decide integer GEMM speed (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted({flag for flag in ("avx2", "avx512_vnni", "avx512_bf16", "amx_int8", "avx_vnni")
                   if f" {flag}" in text})


def rows_bucket(rows: int) -> int:
    return min(1 << max(rows - 1, 0).bit_length(), PROBE_ROWS)


def int8_matmul(codes: torch.Tensor, weight_t: torch.Tensor, group: int, out=None, dtype=torch.float32):
    """Exact Σ_k codes·w by ``torch._int_mm`` per group: [M, N] for one group (into ``out`` if given),
    else [groups, M, N], as ``dtype`` floats. ``weight_t``: int8 [groups, group, N]."""
    if weight_t.shape[0] == 1:
        acc = torch._int_mm(codes.contiguous(), weight_t[0])
        return out.copy_(acc) if out is not None else acc.to(dtype)
    return torch.stack([torch._int_mm(codes[:, g * group:(g + 1) * group].contiguous(), weight_t[g])
                        for g in range(weight_t.shape[0])]).to(dtype)


def transposed_groups(codes: torch.Tensor, group: int) -> torch.Tensor:
    """int8 weight codes [N, K] → [K / group, group, N], the layout ``_int_mm`` reads."""
    n = codes.shape[0]
    return codes.reshape(n, -1, group).permute(1, 2, 0).contiguous()


def _best_ms(fn, repeats: int = 2) -> float:
    fn()  # warm-up: first-call allocation and oneDNN primitive creation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def _measure(rows: int, in_features: int, out_features: int, group: int) -> tuple[float, float]:
    from .quantized_linear import accumulator_dtype, integer_matmul

    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (rows, in_features), dtype=torch.int8, generator=generator)
    weight = torch.randint(-8, 8, (out_features, in_features), dtype=torch.int8, generator=generator)
    dtype = accumulator_dtype(group)
    as_float, as_int = weight.to(dtype), transposed_groups(weight, group)
    int8 = _best_ms(lambda: int8_matmul(codes, as_int, group, dtype=dtype))
    emulated = _best_ms(lambda: integer_matmul(codes, as_float, group))
    return int8, emulated


def decide(rows: int, in_features: int, out_features: int, group: int, policy: str = "auto") -> Decision:
    """The GEMM for this shape under ``policy`` (measured once per process per shape bucket)."""
    bucket = rows_bucket(rows)
    key = (bucket, in_features, out_features, group, policy)
    if key in _decisions:
        return _decisions[key]
    environment = check_policy(ENVIRONMENT, os.environ.get(ENVIRONMENT, "auto"))
    if group * 128 * 8 >= INT32_LIMIT:
        decision = Decision(bucket, in_features, out_features, group, "float", "range")
    elif policy != "auto":
        decision = Decision(bucket, in_features, out_features, group, policy, "option")
    elif environment != "auto":
        decision = Decision(bucket, in_features, out_features, group, environment, "environment")
    else:
        int8_ms, float_ms = _measure(bucket, in_features, out_features, group)
        decision = Decision(bucket, in_features, out_features, group, "int8" if int8_ms < float_ms else "float",
                            "measured", round(int8_ms, 3), round(float_ms, 3))
    _decisions[key] = decision
    return decision


def decisions() -> list[Decision]:
    """Every shape decided so far in this process."""
    return list(_decisions.values())


def forget() -> None:
    """Drop the cached decisions (tests; or after changing ``QUAROT_FX_INT_GEMM``)."""
    _decisions.clear()
