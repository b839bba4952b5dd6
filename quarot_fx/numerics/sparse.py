"""Sparsity jointly with 4-bit weights: Wanda masks, masked GPTQ and OBR (optimal brain restoration).

All three start from the layer objective ‖(W − Ŵ)X‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ), H = Σ xᵀx:

* ``wanda_mask``: keep the largest |W_ij|·‖X_j‖ per row (unstructured) or per group of M inputs (N:M);
* ``masked_gptq_codes``: GPTQ with the pruned weights held at zero as it goes (SparseGPT's
  compensation with a fixed mask): the Wanda + GPTQ baseline;
* ``obr_codes`` (METHODS.md, OBR): grid from the dense W; pruning compensation per row
  w_I += H_II⁻¹ H_IZ w_Z; the kept columns split at α·C_in, the first part RTN and its error
  pushed into the second, w_I2 += H_I2I2⁻¹ H_I2I1 e; the second part by masked GPTQ.

Every row has its own kept set, so the row solves are batched: each chunk of rows gathers its
sub-Hessians into one [rows, k, k] Cholesky, with rows that keep fewer columns padded by identity.
"""

from __future__ import annotations

import re

import torch

from .gptq import damped, gptq_columns, inverse_cholesky, without_dead_inputs
from .quant import symmetric_codes, weight_scales

PATTERN = re.compile(r"^(\d+):(\d+)$")
SOLVE_CHUNK_BYTES = 1 << 27  # gathered sub-Hessians per chunk of rows


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` → None; ``"N:M"`` (N kept of every M consecutive inputs) → (N, M)."""
    if pattern == "unstructured":
        return None
    match = PATTERN.match(pattern) if isinstance(pattern, str) else None
    if not match or not 0 < int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"sparsity_pattern must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'); "
                         f"got {pattern!r}")
    return int(match.group(1)), int(match.group(2))


def pattern_sparsity(sparsity: float, pattern: str) -> float:
    """The fraction of zeros a pattern gives (N:M fixes it at 1 − N/M)."""
    nm = parse_pattern(pattern)
    return sparsity if nm is None else 1 - nm[0] / nm[1]


def wanda_mask(w: torch.Tensor, input_norms: torch.Tensor, sparsity: float, pattern: str = "unstructured"):
    """Bool [out, in], True = kept: the lowest |W_ij|·‖X_j‖ are pruned, exactly ⌊sparsity·in⌋ per row
    (unstructured) or M − N of every M consecutive inputs (N:M)."""
    score = w.abs().float() * input_norms.float()[None, :]
    out, n_in = w.shape
    nm = parse_pattern(pattern)
    keep = torch.ones_like(w, dtype=torch.bool)
    if nm is None:
        pruned = int(sparsity * n_in)
        if pruned:
            drop = torch.topk(score, pruned, dim=1, largest=False).indices
            keep.scatter_(1, drop, False)
        return keep
    n, m = nm
    if n_in % m:
        raise ValueError(f"sparsity_pattern {n}:{m} needs the input width ({n_in}) to be a multiple of {m}")
    groups = score.reshape(out, n_in // m, m)
    drop = torch.topk(groups, m - n, dim=2, largest=False).indices
    return keep.reshape(out, n_in // m, m).scatter_(2, drop, False).reshape(out, n_in)


def solve_rows(h: torch.Tensor, solve_for: torch.Tensor, given: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per row r: δ on the columns A_r = ``solve_for[r]`` with H_AA δ_A = H_AB v_B (B_r = ``given[r]``),
    zero elsewhere: the least-squares compensation of the A weights for a change v on B. [rows, in]."""
    rows, n = solve_for.shape
    result = torch.zeros(rows, n, dtype=h.dtype)
    rhs_all = (v * given).to(h.dtype) @ h  # H symmetric: row r holds Σ_b H[a, b] v_b for every a
    k = int(solve_for.sum(1).max()) if rows else 0
    if k == 0:
        return result
    chunk = max(1, SOLVE_CHUNK_BYTES // (k * k * h.element_size()))
    eye = torch.eye(k, dtype=h.dtype)
    for start in range(0, rows, chunk):
        mask = solve_for[start:start + chunk]
        # the A columns of each row first (stable), padded with columns the row does not solve for
        index = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
        valid = torch.gather(mask, 1, index)
        sub = h[index[:, :, None], index[:, None, :]]
        pair = valid[:, :, None] & valid[:, None, :]
        sub = torch.where(pair, sub, eye)
        rhs = torch.where(valid, torch.gather(rhs_all[start:start + chunk], 1, index), 0.0)
        delta = torch.cholesky_solve(rhs[..., None], torch.linalg.cholesky(sub))[..., 0]
        result[start:start + chunk].scatter_(1, index, torch.where(valid, delta, 0.0))
    return result


def _prepared(w: torch.Tensor, hessian: torch.Tensor, damp: float):
    w, h = without_dead_inputs(w, hessian)
    return w, damped(h, damp)


def masked_gptq_codes(w, hessian, keep, bits, group_size=None, clip_search=True, damp=0.01, block_size=128):
    """Wanda + GPTQ baseline: GPTQ on the dense weight (its grid too, as GPTQ sets it up front) with
    the pruned weights forced to zero, so their whole value is compensated by the later columns
    (SparseGPT-style). int8 codes, scales [out, groups]. (Zeroing them *before* the sweep would
    leave nothing to compensate: GPTQ of the kept weights only.)"""
    w, h = _prepared(w, hessian, damp)
    group_scales = weight_scales(w, bits, group_size, clip_search)
    scales = group_scales.expand(-1, -1, group_size or w.shape[1]).reshape(w.shape)
    codes = gptq_columns(w, inverse_cholesky(h), scales, bits, block_size, keep)
    return codes.to(torch.int8), group_scales[..., 0]


def obr_codes(w, hessian, keep, bits, group_size=None, clip_search=True, damp=0.01, block_size=128,
              alpha: float = 0.5):
    """OBR (METHODS.md): int8 codes with exactly the ``keep`` pattern, and the dense weight's scales."""
    w, h = _prepared(w, hessian, damp)
    group_scales = weight_scales(w, bits, group_size, clip_search)  # 1. grid from the dense weight
    scales = group_scales.expand(-1, -1, group_size or w.shape[1]).reshape(w.shape)
    w = (w + solve_rows(h, keep, ~keep, w)) * keep  # 3. pruning compensation
    split = int(alpha * w.shape[1])
    first = keep.clone()
    first[:, split:] = False
    second = keep & ~first
    codes = torch.zeros_like(w)
    codes[:, :split] = symmetric_codes(w[:, :split], scales[:, :split], bits) * keep[:, :split]  # 4. RTN
    error = (w - codes * scales) * first
    w = w + solve_rows(h, second, first, error)
    tail = h[split:, split:]  # 5. GPTQ on the second group, pruned weights held at zero
    codes[:, split:] = gptq_columns(w[:, split:], inverse_cholesky(tail), scales[:, split:], bits, block_size,
                                    keep[:, split:])
    return codes.to(torch.int8), group_scales[..., 0]
