"""GPTQ: quantize a weight column by column, pushing each column's error onto the columns
not yet quantized, weighted by the inverse Hessian of the layer's inputs (H = Σ xᵀx).

Scales are fixed up front from the whole weight (per row or per group, with the same clip
search as RTN: "static groups"), so act-order and groups combine without bookkeeping.
"""

from __future__ import annotations

import torch

from .quant import dequantize_weight, symmetric_codes, weight_scales


def gptq_codes(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
               clip_search: bool = True, damp: float = 0.01, block_size: int = 128,
               act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of ``w`` [out, in] given H [in, in] (float32 math): int8 codes [out, in], scales [out, groups]."""
    w = w.float().clone()
    h = hessian.float().clone()
    group_scales = weight_scales(w, bits, group_size, clip_search)  # [out, groups, 1]
    scales = group_scales.expand(-1, -1, group_size or w.shape[1]).reshape(w.shape)  # per element
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(w.shape[1])
    w, h, scales = w[:, perm], h[perm][:, perm], scales[:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0])
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for start in range(0, w.shape[1], block_size):
        stop = min(start + block_size, w.shape[1])
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        hinv_block = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col, s = block[:, i], scales[:, start + i]
            codes = symmetric_codes(col, s, bits)
            quantized = codes * s
            q[:, start + i] = codes
            err = (col - quantized) / hinv_block[i, i]
            block[:, i:] -= err[:, None] * hinv_block[i, i:][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return q[:, torch.argsort(perm)].to(torch.int8), group_scales[..., 0]


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = None,
                  clip_search: bool = True, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``w`` with GPTQ (see :func:`gptq_codes`)."""
    if bits >= 16:
        return w
    codes = gptq_codes(w, hessian, bits, group_size, clip_search, damp, block_size, act_order)
    return dequantize_weight(*codes).to(w.dtype)
