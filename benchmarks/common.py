"""Shared helpers of the benchmarks: timing per BENCHMARK.md (median of ≥5 after warm-up)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_summary() -> str:
    """Which CPU gave a figure: model name and the integer-GEMM flags that change what is fast."""
    try:
        info = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return "CPU: unknown"
    from quarot_fx.kernels.int_gemm import cpu_flags

    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return f"CPU: {model}, flags {' '.join(cpu_flags()) or 'none of avx2/avx512_vnni/amx_int8'}"
