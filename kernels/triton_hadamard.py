"""Triton kernel for ``quarot_fx::hadamard_transform`` (the CUDA path).

One launch per Kronecker factor F (order f): view the data as [P, f, Q] and contract the
middle axis, ``y[p, :, q] = x[p, :, q] @ F``. A program takes BLOCK_R (p, q) rows, gathers
their f strided elements into a [BLOCK_R, BLOCK_F] tile and multiplies it by F with
``tl.dot`` (f padded to a power of two ≥ 16 by masking). Stages touch disjoint axes, so
no transposes are needed between them. Runs on CPU tensors under ``TRITON_INTERPRET=1``
(set it before this module is imported), which is how the tests prove it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from quarot_fx.numerics.hadamard import hadamard_plan

from .common import check_hadamard as _check
from .common import compute_dtype, stage_matrix


@triton.jit
def _kron_stage_kernel(
    x_ptr, h_ptr, y_ptr, n_rows, f, q_stride,
    BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_F)
    # Row r = (p, q): its f elements sit at p·f·Q + q + i·Q.
    base = (rows // q_stride) * f * q_stride + rows % q_stride
    offsets = base[:, None] + cols[None, :] * q_stride
    mask = (rows[:, None] < n_rows) & (cols[None, :] < f)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    h_mask = (cols[:, None] < f) & (cols[None, :] < f)
    h = tl.load(h_ptr + cols[:, None] * f + cols[None, :], mask=h_mask, other=0.0)
    y = tl.dot(x, h, input_precision="ieee")
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


def triton_hadamard_transform(x: torch.Tensor, inner: int = 1, block_rows: int = 16) -> torch.Tensor:
    m = _check(x, inner)
    factors = hadamard_plan(m).factors
    if not factors:
        return x.clone(memory_format=torch.contiguous_format)
    if compute_dtype(x.dtype) != torch.float32:
        raise TypeError("the Triton Hadamard kernel computes in float32; got float64 input")
    y = x.contiguous()
    batch_rows = y.numel() // (m * inner)
    before = 1
    for stage, order in enumerate(factors):
        after = m // (before * order)
        scale = 1.0 / math.sqrt(m) if stage == len(factors) - 1 else 1.0
        h = stage_matrix(order, scale, str(x.device), torch.float32)
        last = stage == len(factors) - 1
        out = torch.empty_like(y, dtype=x.dtype if last else torch.float32)
        n_rows = batch_rows * before * after * inner  # one row per (p, q) pair
        grid = (triton.cdiv(n_rows, block_rows),)
        _kron_stage_kernel[grid](
            y, h, out, n_rows, order, after * inner,
            BLOCK_R=block_rows, BLOCK_F=max(16, triton.next_power_of_2(order)),
        )
        y, before = out, before * order
    return y
