"""GPTQ: quantize a weight column by column, pushing each column's error onto the columns
not yet quantized, weighted by the inverse Hessian of the layer's inputs (H = Σ xᵀx).

Scales are fixed up front from the whole weight (per row or per group, with the same clip
search as RTN: "static groups"), so act-order and groups combine without bookkeeping.
"""

from __future__ import annotations

import torch

from .quant import dequantize_weight, symmetric_codes, weight_scales


def without_dead_inputs(w: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 copies of W and H with inputs that never fire (H_jj = 0) zeroed in W and given a
    unit diagonal in H, so H stays invertible."""
    w, h = w.float().clone(), hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h


def damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp·mean(diag H)·I: keeps the Cholesky factorization stable."""
    return h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)


def inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹: row i holds what GPTQ needs when column i is quantized."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_columns(w: torch.Tensor, hinv: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int = 128,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
    """The GPTQ sweep: float codes [out, in] of ``w`` (float32, not modified) with per-element
    ``scales``; each column's rounding error goes to the columns after it. With a ``keep`` mask
    the pruned weights are quantized to zero and their whole value is compensated (SparseGPT)."""
    w = w.clone()
    q = torch.zeros_like(w)
    for start in range(0, w.shape[1], block_size):
        stop = min(start + block_size, w.shape[1])
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        hinv_block = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col, s = block[:, i], scales[:, start + i]
            codes = symmetric_codes(col, s, bits)
            if keep is not None:
                codes = codes * keep[:, start + i]
            q[:, start + i] = codes
            err = (col - codes * s) / hinv_block[i, i]
            block[:, i:] -= err[:, None] * hinv_block[i, i:][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return q


def gptq_codes(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
               clip_search: bool = True, damp: float = 0.01, block_size: int = 128,
               act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of ``w`` [out, in] given H [in, in] (float32 math): int8 codes [out, in], scales [out, groups]."""
    group_scales = weight_scales(w.float(), bits, group_size, clip_search)  # [out, groups, 1]
    scales = group_scales.expand(-1, -1, group_size or w.shape[1]).reshape(w.shape)  # per element
    w, h = without_dead_inputs(w, hessian)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(w.shape[1])
    w, h, scales = w[:, perm], h[perm][:, perm], scales[:, perm]
    q = gptq_columns(w, inverse_cholesky(damped(h, damp)), scales, bits, block_size)
    return q[:, torch.argsort(perm)].to(torch.int8), group_scales[..., 0]


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
                  clip_search: bool = True, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``w`` with GPTQ (see :func:`gptq_codes`)."""
    if bits >= 16:
        return w
    codes = gptq_codes(w, hessian, bits, group_size, clip_search, damp, block_size, act_order)
    return dequantize_weight(*codes).to(w.dtype)
