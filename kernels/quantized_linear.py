"""``quarot_fx::quantized_linear``: y = x·Wᵀ + b with W held as packed int4 plus scales.

* ``weight``: uint8 [out, ceil(in/2)], two int4 codes per byte (``pack_int4`` layout);
  ``weight_scale``: float32 [out, groups], one scale per output channel (groups = 1) or per
  group of ``in / groups`` inputs.
* ``x``: int8 codes [..., in] with ``x_scale`` float32 [..., 1] (from ``quantize_per_token``),
  or float activations with ``x_scale=None`` (weight-only: dequantize, float matmul).

Integer semantics: acc = Σ_k qx·qw per group is an exact integer; y = Σ_g acc_g·s_w,g·s_x + b.
CPU emulates the integer GEMM with a float32 matmul on integer-valued tensors (exact while
|acc| < 2²⁴, i.e. group · 128 · 8 < 2²⁴; float64 beyond), because ``torch._int_mm`` is ~60×
slower than an fp32 matmul on this kind of CPU. CUDA: the Triton GEMM in ``triton_linear``.
"""

from __future__ import annotations

from typing import Optional

import torch

from quarot_fx.quant import dequantize_weight

from .int4 import unpack_int4_reference

EXACT_FLOAT32 = 2**24
MAX_PRODUCT = 128 * 8  # |int8 activation code| · |int4 weight code|


def _check(x, x_scale, weight, weight_scale, bias, in_features) -> int:
    """Validate shapes and dtypes; returns the group size."""
    if weight.dtype != torch.uint8 or weight.dim() != 2:
        raise TypeError(f"quantized_linear: weight must be packed uint8 [out, in/2]; got {weight.dtype} {tuple(weight.shape)}")
    out_features, groups = weight_scale.shape
    if weight.shape != (out_features, (in_features + 1) // 2):
        raise ValueError(f"quantized_linear: weight {tuple(weight.shape)} does not hold [{out_features}, {in_features}] int4")
    if x.shape[-1] != in_features:
        raise ValueError(f"quantized_linear: input has {x.shape[-1]} features, weight expects {in_features}")
    if in_features % groups or (groups > 1 and (in_features // groups) % 2):
        raise ValueError(f"quantized_linear: {groups} groups must split {in_features} inputs into even groups")
    if (x_scale is None) != x.is_floating_point():
        raise TypeError("quantized_linear: int8 codes need x_scale; float activations take x_scale=None")
    if x_scale is not None and x.dtype != torch.int8:
        raise TypeError(f"quantized_linear: activation codes must be int8; got {x.dtype}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"quantized_linear: bias {tuple(bias.shape)} does not match {out_features} outputs")
    return in_features // groups


def integer_matmul(codes: torch.Tensor, weight_codes: torch.Tensor, group: int) -> torch.Tensor:
    """Exact Σ_k codes·weight_codes per group: [groups, M, N] integer-valued floats."""
    dtype = torch.float32 if group * MAX_PRODUCT < EXACT_FLOAT32 else torch.float64
    rows, n = codes.shape[0], weight_codes.shape[0]
    a = codes.to(dtype).reshape(rows, -1, group).transpose(0, 1)  # [G, M, group]
    b = weight_codes.to(dtype).reshape(n, -1, group).permute(1, 2, 0)  # [G, group, N]
    return torch.bmm(a, b) if a.shape[0] > 1 else (a[0] @ b[0])[None]


def _linear(x, x_scale, weight, weight_scale, bias, in_features, out_dtype, matmul) -> torch.Tensor:
    group = _check(x, x_scale, weight, weight_scale, bias, in_features)
    lead, out_features = x.shape[:-1], weight.shape[0]
    codes = unpack_int4_reference(weight, in_features)
    x2 = x.reshape(-1, in_features)
    if x_scale is None:
        y = x2.float() @ dequantize_weight(codes, weight_scale).T
    else:
        acc = matmul(x2, codes, group)
        y = (acc * weight_scale.T[:, None, :]).sum(0) if acc.shape[0] > 1 else acc[0] * weight_scale[:, 0]
        y = y * x_scale.reshape(-1, 1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*lead, out_features)


def _int64_matmul(codes, weight_codes, group):
    a = codes.long().reshape(codes.shape[0], -1, group)
    b = weight_codes.long().reshape(weight_codes.shape[0], -1, group)
    return torch.einsum("mgk,ngk->gmn", a, b).double()


def quantized_linear_reference(x, x_scale, weight, weight_scale, bias, in_features, out_dtype) -> torch.Tensor:
    """Plain torch with int64 accumulation (slow, obviously exact)."""
    return _linear(x, x_scale, weight, weight_scale, bias, in_features, out_dtype, _int64_matmul)


@torch.library.custom_op("quarot_fx::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, x_scale: Optional[torch.Tensor], weight: torch.Tensor,
                     weight_scale: torch.Tensor, bias: Optional[torch.Tensor], in_features: int,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """x·Wᵀ + b from int8 activation codes (or float x) and packed int4 weights; see the module doc."""
    return _linear(x, x_scale, weight, weight_scale, bias, in_features, out_dtype, integer_matmul)


@quantized_linear.register_fake
def _(x, x_scale, weight, weight_scale, bias, in_features, out_dtype):
    _check(x, x_scale, weight, weight_scale, bias, in_features)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


@quantized_linear.register_kernel("cuda")
def _(x, x_scale, weight, weight_scale, bias, in_features, out_dtype):
    from .triton_int4 import triton_unpack_int4
    from .triton_linear import triton_w4a_linear

    _check(x, x_scale, weight, weight_scale, bias, in_features)
    if x_scale is None:  # weight-only: unpack on the GPU, float matmul
        w = dequantize_weight(triton_unpack_int4(weight, in_features), weight_scale)
        y = x.float() @ w.T + (bias.float() if bias is not None else 0)
        return y.to(out_dtype)
    return triton_w4a_linear(x, x_scale, weight, weight_scale, bias, in_features, out_dtype)
