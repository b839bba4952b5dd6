"""Shared helpers of the benchmarks: timing per BENCHMARK.md (median of ≥5 after warm-up)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from quarot_fx.tools.footprint import cpu_summary  # noqa: F401  (the benchmarks name their CPU with it)


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
