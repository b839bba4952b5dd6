"""Triton W4A4/W4A8 GEMM for ``quarot_fx::quantized_linear`` (the CUDA path).

Tile [BM, BN] of y; per weight group, the K loop reads BKB packed bytes per weight row,
splits them into low/high nibbles as int8 (half-split layout: byte j of a group holds inputs
j and j + half), and accumulates ``tl.dot(x_low, lo) + tl.dot(x_high, hi)`` in int32, both
activation tiles contiguous loads: no interleaving in registers. At the
group's end the int32 sum is scaled by the group's weight scale into a float32 accumulator;
the epilogue applies the per-token activation scale and the bias. Exact integer parts are
proved against the CPU op under ``TRITON_INTERPRET=1`` (unit scales).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import signed_nibble


@triton.jit
def _w4a_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, n_bytes, groups, group, half,
                     HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    kb = tl.arange(0, BKB)
    m_ok = rm[:, None] < M
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for g in range(groups):
        acc_int = tl.zeros((BM, BN), dtype=tl.int32)
        for start in range(0, half, BKB):
            j = start + kb  # byte j of the group: inputs g·group + j (low) and g·group + half + j (high)
            low_ok = j < half
            high_ok = half + j < group
            x_row = x_ptr + rm[:, None] * K + g * group
            x_low = tl.load(x_row + j[None, :], mask=m_ok & low_ok[None, :], other=0)
            x_high = tl.load(x_row + half + j[None, :], mask=m_ok & high_ok[None, :], other=0)
            w = tl.load(w_ptr + rn[None, :] * n_bytes + g * half + j[:, None], mask=(rn[None, :] < N) & low_ok[:, None],
                        other=0).to(tl.int32)  # [BKB, BN]: the weight transposed
            lo = signed_nibble(w).to(tl.int8)
            hi = signed_nibble(w >> 4).to(tl.int8)
            acc_int += tl.dot(x_low, lo) + tl.dot(x_high, hi)
        w_scale = tl.load(ws_ptr + rn * groups + g, mask=rn < N, other=0.0)
        acc += acc_int.to(tl.float32) * w_scale[None, :]
    y = acc * tl.load(xs_ptr + rm, mask=rm < M, other=0.0)[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def triton_w4a_linear(x, x_scale, weight, weight_scale, bias, in_features: int, out_dtype: torch.dtype,
                      block_m: int = 16, block_n: int = 32, block_k_bytes: int = 16) -> torch.Tensor:
    """int8 codes [..., K] × packed int4 [N, K/2] → out_dtype [..., N]; shapes checked by the op."""
    lead, n = x.shape[:-1], weight.shape[0]
    x2 = x.reshape(-1, in_features).contiguous()
    m, groups = x2.shape[0], weight_scale.shape[1]
    group = in_features // groups
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w4a_gemm_kernel[grid](x2, x_scale.reshape(-1).float().contiguous(), weight.contiguous(),
                           weight_scale.float().contiguous(), bias if bias is not None else x_scale, y,
                           m, n, in_features, weight.shape[1], groups, group, (group + 1) // 2,
                           HAS_BIAS=bias is not None, BM=block_m, BN=block_n, BKB=block_k_bytes)
    return y.reshape(*lead, n)
