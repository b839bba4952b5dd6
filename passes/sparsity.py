"""The sparsity a compiled model really stores, counted from its final weights (not from the mask
that was asked for): the report's proof that the pattern holds."""

from __future__ import annotations

import torch

from quarot_fx.numerics.sparse import parse_pattern

from .edits import GPTQWeight


def prunes(entry) -> bool:
    return bool(entry.edits) and isinstance(entry.edits[-1], GPTQWeight) and entry.edits[-1].prunes


def record_sparsity(report, weight: torch.Tensor, edit: GPTQWeight) -> None:
    """Count zeros of a stored [out, in] weight (codes or floats) and check the pattern: every row has
    at least ⌊s·in⌋ zeros (unstructured), every group of M inputs at least M − N (N:M). Kept weights
    that round to zero make the count exceed the mask, never fall short of it."""
    zero = weight == 0
    out, n_in = zero.shape
    nm = parse_pattern(edit.pattern)
    if nm is None:
        ok = bool((zero.sum(1) >= int(edit.sparsity * n_in)).all())
    else:
        n, m = nm
        ok = n_in % m == 0 and bool((zero.reshape(out, -1, m).sum(2) >= m - n).all())
    report.counters["sparse_linears"] += 1
    report.counters["sparse_weights"] += zero.numel()
    report.counters["sparse_zeros"] += int(zero.sum())
    report.counters["sparse_pattern_violations"] += 0 if ok else 1


def storage_format(edit: GPTQWeight, in_features: int) -> tuple[str, int]:
    """(compressed format, weights kept per row) for a pruned weight: "2:4" where it fits (in % 8
    == 0), else a bitmap, which any pattern with the same count per row fits."""
    nm = parse_pattern(edit.pattern)
    if nm == (2, 4) and in_features % 8 == 0:
        return "2:4", in_features // 2
    if nm is None:
        return "bitmap", in_features - int(edit.sparsity * in_features)
    n, m = nm
    return "bitmap", in_features // m * n
