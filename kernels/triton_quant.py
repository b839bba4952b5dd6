"""Triton kernels for activation and KV quantization (the CUDA path).

Rounding matches torch exactly: divisions are IEEE (``div_rn``) and round-half-to-even is
``(v + 1.5·2²³) - 1.5·2²³`` in float32 (exact for |v| < 2²², far above any code here).

Fused Hadamard + quantization: one program per token. The transform matrix
H_m ⊗ I_inner / √m is split as A ⊗ B with a, b ≤ 128 (``kronecker_split``); the token,
viewed as a [a, b] tile X, becomes Aᵀ·X·B (two ``tl.dot``), is quantized in registers and
written once as int8. Sizes with no such split (a Paley factor > 128, e.g. 11008 = 344·32)
fall back to the Hadamard kernel followed by the plain quantization kernel.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from quarot_fx.numerics.hadamard import factor_matrix, hadamard_plan
from quarot_fx.numerics.quant import scale_divisor

from .common import check_hadamard as _check_hadamard
from .common import kv_code_bytes as code_bytes
from .common import kv_packs as packs
from .triton_common import signed_nibble

MAX_TILE = 128
ROUND = 12582912.0  # 1.5 · 2²³


@triton.jit
def _rint(v):
    return (v + ROUND) - ROUND


@triton.jit
def _unit_where_zero(scale, nan_count):
    """Scale 1 for an all-zero group; NaN when the group holds a NaN (tl.max may drop NaN), so
    the outputs computed with this scale are NaN as in eager; Inf stays Inf."""
    scale = tl.where(scale == 0, 1.0, scale)
    return tl.where(nan_count > 0, float("nan"), scale)


@triton.jit
def _store_symmetric(y, q_ptrs, mask, s_ptr, divisor, QMAX: tl.constexpr):
    amax = tl.max(tl.max(tl.abs(y), axis=1), axis=0)
    nans = tl.sum(tl.sum((y != y).to(tl.int32), axis=1), axis=0)
    scale = _unit_where_zero(tl.math.div_rn(amax, divisor), nans)  # divisor = qmax / clip, as symmetric_scale
    q = tl.clamp(_rint(tl.math.div_rn(y, scale)), -QMAX - 1.0, QMAX * 1.0)
    tl.store(q_ptrs, q.to(tl.int8), mask=mask)
    tl.store(s_ptr, scale)


@triton.jit
def _token_quant_kernel(x_ptr, a_ptr, b_ptr, q_ptr, s_ptr, divisor, A: tl.constexpr, B: tl.constexpr,
                        BA: tl.constexpr, BB: tl.constexpr, QMAX: tl.constexpr, ROTATE: tl.constexpr):
    """One token of n = A·B elements viewed as an [A, B] tile; optionally Aᵀ·X·B, then quantize."""
    row = tl.program_id(0)
    i = tl.arange(0, BA)
    j = tl.arange(0, BB)
    offsets = row * A * B + i[:, None] * B + j[None, :]
    mask = (i[:, None] < A) & (j[None, :] < B)
    y = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if ROTATE:
        a_t = tl.load(a_ptr + i[None, :] * A + i[:, None], mask=(i[:, None] < A) & (i[None, :] < A), other=0.0)
        b = tl.load(b_ptr + j[:, None] * B + j[None, :], mask=(j[:, None] < B) & (j[None, :] < B), other=0.0)
        y = tl.dot(y, b, input_precision="ieee")
        y = tl.dot(a_t, y, input_precision="ieee")
    _store_symmetric(y, q_ptr + offsets, mask, s_ptr + row, divisor, QMAX)


def _tile(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dim ≥ 16


def kronecker_split(m: int, inner: int) -> tuple[int, int] | None:
    """(a, b) with H_m ⊗ I_inner = A ⊗ B, both ≤ 128, smallest padded tile; None if none exists.

    A must be a product of leading Kronecker factors (times a divisor of ``inner`` once all
    Hadamard factors are in A), so that A and B are themselves Kronecker products.
    """
    factors = hadamard_plan(m).factors
    prefixes = [math.prod(factors[:k]) for k in range(len(factors))]
    prefixes += [m * d for d in range(1, inner + 1) if inner % d == 0]
    n = m * inner
    splits = [(a, n // a) for a in prefixes if a <= MAX_TILE and n // a <= MAX_TILE]
    if not splits:
        return None
    return min(splits, key=lambda ab: (_tile(ab[0]) * _tile(ab[1]), _tile(ab[0]) + _tile(ab[1])))


def _kron(orders, identity: int) -> torch.Tensor:
    out = torch.eye(identity, dtype=torch.float64)
    for order in reversed(orders):
        out = torch.kron(factor_matrix(order, torch.float64), out)
    return out


def split_matrices(m: int, inner: int, a: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A (with the 1/√m scale) and B of the split at ``a``, float32 on ``device``."""
    factors = hadamard_plan(m).factors
    k = next((k for k in range(len(factors)) if math.prod(factors[:k]) == a), len(factors))
    d = a // math.prod(factors[:k])  # part of I_inner that goes to A (1 unless A holds all of H_m)
    a_mat = _kron(factors[:k], d) / math.sqrt(m)
    b_mat = _kron(factors[k:], inner // d)
    return a_mat.to(device, torch.float32).contiguous(), b_mat.to(device, torch.float32).contiguous()


def triton_quantize_per_token(x: torch.Tensor, bits: int, clip: float, hadamard_inner: int = 0):
    n = x.shape[-1]
    rows = x.numel() // max(n, 1)
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    split = None
    if hadamard_inner:
        m = _check_hadamard(x, hadamard_inner)
        split = kronecker_split(m, hadamard_inner)
        if split is None:  # no tile-sized split: rotate with the Hadamard kernel, then quantize
            from .triton_hadamard import triton_hadamard_transform

            return triton_quantize_per_token(triton_hadamard_transform(x, hadamard_inner), bits, clip)
    a, b = split or (1, n)
    a_mat, b_mat = split_matrices(n // hadamard_inner, hadamard_inner, a, x.device) if split else (x, x)
    _token_quant_kernel[(rows,)](x.contiguous(), a_mat, b_mat, codes, scales, scale_divisor(bits, clip), A=a, B=b,
                                 BA=_tile(a) if split else 1, BB=_tile(b) if split else triton.next_power_of_2(b),
                                 QMAX=2 ** (bits - 1) - 1, ROTATE=split is not None)
    return codes, scales


@triton.jit
def _kv_quant_kernel(x_ptr, c_ptr, s_ptr, z_ptr, d, n_bytes, clip,
                     LEVELS: tl.constexpr, BLOCK: tl.constexpr, PACK: tl.constexpr):
    """One head vector of d elements; even and odd elements kept apart so bytes pack directly."""
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK)
    even_mask, odd_mask = 2 * k < d, 2 * k + 1 < d
    # Padding with 0 is harmless: the range is [min(x, 0), max(x, 0)].
    even = tl.load(x_ptr + row * d + 2 * k, mask=even_mask, other=0.0).to(tl.float32)
    odd = tl.load(x_ptr + row * d + 2 * k + 1, mask=odd_mask, other=0.0).to(tl.float32)
    hi = tl.maximum(tl.maximum(tl.max(even, axis=0), tl.max(odd, axis=0)), 0.0) * clip
    lo = tl.minimum(tl.minimum(tl.min(even, axis=0), tl.min(odd, axis=0)), 0.0) * clip
    nans = tl.sum((even != even).to(tl.int32), axis=0) + tl.sum((odd != odd).to(tl.int32), axis=0)
    scale = _unit_where_zero(tl.math.div_rn(hi - lo, LEVELS * 1.0), nans)
    zero = _rint(tl.math.div_rn(-lo, scale))
    q_even = tl.clamp(_rint(tl.math.div_rn(even, scale)) + zero, 0.0, LEVELS * 1.0).to(tl.int32)
    q_odd = tl.clamp(_rint(tl.math.div_rn(odd, scale)) + zero, 0.0, LEVELS * 1.0).to(tl.int32)
    if PACK:
        byte = ((q_even - 8) & 0xF) | (tl.where(odd_mask, (q_odd - 8) & 0xF, 0) << 4)
        tl.store(c_ptr + row * n_bytes + k, byte.to(tl.uint8), mask=k < n_bytes)
    else:
        tl.store(c_ptr + row * d + 2 * k, q_even.to(tl.uint8), mask=even_mask)
        tl.store(c_ptr + row * d + 2 * k + 1, q_odd.to(tl.uint8), mask=odd_mask)
    tl.store(s_ptr + row, scale)
    tl.store(z_ptr + row, zero)


@triton.jit
def _kv_dequant_kernel(c_ptr, s_ptr, z_ptr, y_ptr, d, n_bytes, BLOCK: tl.constexpr, PACK: tl.constexpr):
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK)
    even_mask, odd_mask = 2 * k < d, 2 * k + 1 < d
    if PACK:
        byte = tl.load(c_ptr + row * n_bytes + k, mask=k < n_bytes, other=0).to(tl.int32)
        q_even = (signed_nibble(byte) + 8).to(tl.float32)  # stored as code - 8
        q_odd = (signed_nibble(byte >> 4) + 8).to(tl.float32)
    else:
        q_even = tl.load(c_ptr + row * d + 2 * k, mask=even_mask, other=0).to(tl.float32)
        q_odd = tl.load(c_ptr + row * d + 2 * k + 1, mask=odd_mask, other=0).to(tl.float32)
    scale = tl.load(s_ptr + row)
    zero = tl.load(z_ptr + row).to(tl.float32)  # float32, or uint8 as a packed cache stores it
    out = y_ptr.dtype.element_ty
    tl.store(y_ptr + row * d + 2 * k, ((q_even - zero) * scale).to(out), mask=even_mask)
    tl.store(y_ptr + row * d + 2 * k + 1, ((q_odd - zero) * scale).to(out), mask=odd_mask)


def triton_kv_quantize(x: torch.Tensor, bits: int, clip: float):
    d = x.shape[-1]
    rows, n_bytes = x.numel() // max(d, 1), code_bytes(d, bits)
    codes = torch.empty((*x.shape[:-1], n_bytes), dtype=torch.uint8, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    zero = torch.empty_like(scale)
    _kv_quant_kernel[(rows,)](x.contiguous(), codes, scale, zero, d, n_bytes, clip, LEVELS=2**bits - 1,
                              BLOCK=triton.next_power_of_2((d + 1) // 2), PACK=packs(bits))
    return codes, scale, zero


def triton_kv_dequantize(codes, scale, zero, bits: int, length: int, dtype: torch.dtype):
    rows = codes.numel() // max(codes.shape[-1], 1)
    out = torch.empty((*codes.shape[:-1], length), dtype=dtype, device=codes.device)
    _kv_dequant_kernel[(rows,)](codes.contiguous(), scale.contiguous(), zero.contiguous(), out, length,
                                codes.shape[-1], BLOCK=triton.next_power_of_2((length + 1) // 2), PACK=packs(bits))
    return out
