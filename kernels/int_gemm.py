"""Which exact integer GEMM the CPU runs for ``quantized_linear``: a real int8 GEMM, float32
emulation, or ``native``'s C kernels over the packed int4 weight (a GEMV at 1..16 rows, a blocked
GEMM beyond).

Both compute Σ_k qx·qw exactly: ``torch._int_mm`` accumulates in int32 (exact while K·128·8 < 2³¹),
the emulation multiplies integer-valued float32 tensors (exact while the sum stays below 2²⁴,
float64 beyond, see ``accumulator_dtype``). The int32 sums convert to the same floats, so the
two paths give the same output bit for bit and the choice is purely one of speed. The third exact
way is ``native``'s C kernels: at 1..16 rows (decode) a GEMV that reads the packed int4 bytes, 1/8
of the emulation's fp32 weights; beyond, a GEMM that multiplies bytes with AVX2's vpmaddubsw (32
multiply-adds per instruction pair against 8 per fp32 FMA) where ``_int_mm`` has no fast kernel.

Which is faster depends on the CPU: with AVX512-VNNI or AMX, oneDNN's int8 GEMM beats an fp32
matmul several times; with only AVX2 it was measured 15-50× *slower*. So nothing is hard-coded:
on first use of a shape (rows bucketed to powers of two up to ``BUCKET_ROWS``) the paths are timed
once on that shape and the fastest is kept for the rest of the process. A GEMM's work grows with
the rows, so a bucket past ``PROBE_ROWS`` is first timed at ``PROBE_ROWS`` rows and scaled, and the
candidates within ``FINALIST_RATIO`` of the best estimate are then timed again at the bucket's own
rows: scaling multiplies a GEMM's per-call fixed work (the C GEMM packs its weight panels once per
call) and whatever else does not grow with the rows. On an AVX512-VNNI EPYC the estimate put
576 → 576 at 2048 rows at 2.75 ms for ``_int_mm`` and 3.96 ms for the C GEMM, where both take
1.6-1.9 ms, and chose ``_int_mm`` for shapes where the C GEMM was faster. The slow paths (float
emulation, int8 without VNNI) stay out of the second round, whose timings would take seconds. Where the
weight is unpacked on every call (``resident_weights="packed"``, the default) that unpacking is
timed apart and added once, since it does not grow with the rows: it decides a decode step (the
GEMV on packed bytes wins) and hardly matters to a 2048-row prefill (an int8 GEMM may win). At ≤ 16
rows each is timed over enough copies of the weight to exceed the last-level cache, as in a model whose
layers each read their own weights: at decode, weights stream from memory, and a weight that
stays in cache would flatter the path that reads more bytes.

Policy, strongest first: the compile option ``int_gemm`` ("int8" | "float" | "int4"), the
environment variable ``QUAROT_FX_INT_GEMM`` (same values), else "auto" (the measurement).
"int4" applies where the C kernels do (``native.applies``); other shapes are measured as under "auto".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from quarot_fx.config import GEMM_ENVIRONMENT as ENVIRONMENT  # noqa: F401  (tests set it)
from quarot_fx.config import gemm_environment

from .common import cpu_description
from .gemm import accumulator_dtype, gemm_candidate, gemm_candidates, gemm_policies, pack_linear_weight
BUCKET_ROWS = 2048  # row counts are bucketed to powers of two up to this many
PROBE_ROWS = 128  # a GEMM is first timed at most at this many rows, and its time scaled for a larger bucket
FINALIST_RATIO = 2.0  # candidates whose scaled time is within this of the best are timed at the full rows


@dataclass(frozen=True)
class Decision:
    """The GEMM chosen for one (rows bucket, in, out, group) shape, and what was measured."""

    rows: int
    in_features: int
    out_features: int
    group: int
    choice: str  # a registered candidate: "int8" | "float" | "int4" | …
    by: str  # "measured" | "option" | "environment" | "range" (the only candidate that applies)
    ms: tuple = ()  # (candidate, milliseconds) when measured: at the bucket's rows for the finalists

    def ms_of(self, name: str) -> float | None:
        return dict(self.ms).get(name)

    int8_ms = property(lambda self: self.ms_of("int8"))
    float_ms = property(lambda self: self.ms_of("float"))
    int4_ms = property(lambda self: self.ms_of("int4"))


_decisions: dict[tuple, Decision] = {}
_decided: dict[tuple, tuple] = {}  # (bucket, in, out, group, policy, int4, unpacks) → (candidates then, decision)


def check_policy(name: str, value: str) -> str:
    if value not in gemm_policies():
        raise ValueError(f"{name}={value!r} is not a GEMM policy; choose one of {', '.join(gemm_policies())}")
    return value


def cpu_flags() -> list[str]:
    """The CPU features that decide integer GEMM (and bf16) speed (empty off Linux)."""
    flags = {flag for line in cpu_description() if line.startswith("flags") for flag in line.split()}
    return sorted(flags & {"avx2", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "avx_vnni"})


def rows_bucket(rows: int) -> int:
    return min(1 << max(rows - 1, 0).bit_length(), BUCKET_ROWS)


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache (32 MiB if the system does not say)."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=32 << 20)


MIN_REPEAT_S = 0.02  # a timed repeat lasts at least this long, so sub-millisecond calls are not one clock tick


def streamed_ms(fn, weights: list, repeats: int = 2) -> float:
    """Milliseconds per call of ``fn(weight)``, cycling through copies of the weight so that each
    call reads its weight from memory rather than from cache; the best of ``repeats`` passes,
    each of enough passes over the copies to last ``MIN_REPEAT_S`` (one for a slow path)."""
    start = time.perf_counter()
    fn(weights[0])  # warm-up: first-call allocation, oneDNN primitive creation
    fn(weights[-1])
    passes = max(1, int(MIN_REPEAT_S / max(time.perf_counter() - start, 1e-9) * 2 / len(weights)))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(passes):
            for weight in weights:
                fn(weight)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / (passes * len(weights))


def weight_copies(weight, scale=None, stream: bool = True, limit: int = 256) -> list:
    """Enough copies of (weight, scale) to overflow the last-level cache twice over (``stream``),
    else the one: a GEMM of many rows reuses each weight enough that where it comes from hardly
    matters, and timing copies of a slow path there would take seconds."""
    count = min(limit, max(1, -(-2 * last_level_cache_bytes() // (weight.numel() * weight.element_size()))))
    return [(weight.clone(), scale) for _ in range(count if stream else 1)]


def measure(rows: int, in_features: int, out_features: int, group: int, candidates: tuple,
            repeats: int = 2, unpacks: bool = False, probe_rows: int = PROBE_ROWS) -> dict:
    """Milliseconds per call of each candidate (registered in ``gemm``) on this shape, on random
    codes, over weight copies that exceed the cache at decode rows (``benchmarks/int_gemm.py``
    prints the same timings). Past ``probe_rows`` rows a candidate is timed at ``probe_rows`` and
    scaled. ``unpacks``: each call unpacks the packed weight first (it is not kept resident), so a
    candidate that multiplies unpacked codes has that time added (timed on its own: it does not
    grow with the rows)."""
    from . import native
    from .gemm import unpack_linear_weight

    timed_rows = min(rows, probe_rows)
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (timed_rows, in_features), dtype=torch.int8, generator=generator)
    weight = torch.randint(-8, 8, (out_features, in_features), dtype=torch.int8, generator=generator)
    dtype, stream, groups = accumulator_dtype(group), timed_rows <= native.FEW_ROWS, in_features // group
    x_scale = torch.ones(timed_rows, 1)
    packed = pack_linear_weight(weight, groups)
    ms = {}
    for name in candidates:
        c = gemm_candidate(name)
        if c.linear is not None:
            ms[name] = streamed_ms(lambda w, c=c: c.linear(codes, x_scale, *w, None, in_features),
                                   weight_copies(packed, torch.ones(out_features, 1), stream), repeats)
        else:
            ms[name] = streamed_ms(lambda w, c=c: c.matmul(codes, w[0], group, None, dtype),
                                   weight_copies(c.prepare(weight, group, dtype), stream=stream), repeats)
        ms[name] *= rows / timed_rows
        if unpacks and c.linear is None:
            ms[name] += streamed_ms(lambda w, c=c: c.prepare(unpack_linear_weight(w[0], in_features, groups), group, dtype),
                                    weight_copies(packed, stream=stream), repeats)
    return ms


def decide(rows: int, in_features: int, out_features: int, group: int, policy: str = "auto",
           int4: bool = True, unpacks: bool = False) -> Decision:
    """The GEMM for this shape under ``policy`` (measured once per process per shape bucket).
    ``int4``: the weight is in the dense packed layout the C kernels read (not compressed sparse
    storage). ``unpacks``: each call unpacks the weight (``resident_weights="packed"``), which the
    measurement then includes. A forced candidate that does not apply to the shape is replaced by
    the measured fastest of those that do (by "range" when only one does, e.g. int32 could overflow).
    Past ``PROBE_ROWS`` rows the finalists of the scaled estimate are timed again at the bucket's rows
    (see the module doc)."""
    bucket = rows_bucket(rows)
    known = _decided.get((bucket, in_features, out_features, group, policy, int4, unpacks))
    if known is not None and known[0] == gemm_candidates():  # the per-call path: one lookup
        return known[1]
    applicable = tuple(name for name in gemm_candidates()
                       if gemm_candidate(name).applies(bucket, in_features, out_features, group, int4))
    key = (bucket, in_features, out_features, group, policy, applicable, unpacks)
    if key in _decisions:
        return _decisions[key]
    forced, by = (policy, "option") if policy != "auto" else (gemm_environment(), "environment")
    if forced in applicable:
        decision = Decision(bucket, in_features, out_features, group, forced, by)
    elif len(applicable) == 1:
        decision = Decision(bucket, in_features, out_features, group, applicable[0], "range")
    else:
        ms = measure(bucket, in_features, out_features, group, applicable, unpacks=unpacks)
        finalists = tuple(name for name in applicable if ms[name] <= FINALIST_RATIO * min(ms.values()))
        if bucket > PROBE_ROWS and len(finalists) > 1:
            ms.update(measure(bucket, in_features, out_features, group, finalists, unpacks=unpacks,
                              probe_rows=bucket))
        decision = Decision(bucket, in_features, out_features, group, min(ms, key=ms.get), "measured",
                            tuple((name, round(t, 4)) for name, t in ms.items()))
    _decisions[key] = decision
    _decided[key[:5] + (int4, unpacks)] = (gemm_candidates(), decision)
    return decision


def decisions() -> list[Decision]:
    """Every shape decided so far in this process."""
    return list(_decisions.values())


def forget() -> None:
    """Drop the cached decisions (tests; or after changing ``QUAROT_FX_INT_GEMM``), those handed
    over to the C++ kernels too."""
    from . import native_ops

    _decisions.clear()
    _decided.clear()
    native_ops.forget()
