"""``quarot_fx::kv_quantize`` / ``kv_dequantize``: asymmetric KV-cache quantization per head.

``kv_quantize(x, bits, clip)`` quantizes each [head_dim] vector of keys or values to codes
in [0, 2^b - 1] with a float32 scale and zero point ([..., 1] each). At ≤ 4 bits the codes
are packed two per byte (stored as ``code - 8`` in the ``pack_int4`` layout, so one packing
routine serves weights and cache); at 5–8 bits one byte holds one code.
``kv_dequantize(codes, scale, zero, bits, length, dtype)`` gives (code - zero) · scale back; the
zero point may be float32 or uint8 (it is an integer in [0, 2^b - 1], so a packed cache stores
it in one byte).
"""

from __future__ import annotations

import torch

from quarot_fx.numerics.quant import asymmetric_codes

from .common import check_bits, check_inputs, define_op
from .common import kv_code_bytes as code_bytes
from .common import kv_packs as packs
from .int4 import pack_int4_reference, unpack_int4_reference


def kv_quantize_reference(x: torch.Tensor, bits: int, clip: float):
    check_inputs(x, bits, clip, "kv_quantize")
    q, scale, zero = asymmetric_codes(x.float(), bits, clip)
    codes = pack_int4_reference((q - 8).to(torch.int8)) if packs(bits) else q.to(torch.uint8)
    return codes, scale, zero


def _quantize_cpu(x: torch.Tensor, bits: int, clip: float):
    """The C kernel where it was built and every value is finite, else the reference; the same
    bits either way."""
    from . import native

    check_inputs(x, bits, clip, "kv_quantize")
    if x.device.type == "cpu" and x.numel() and native.library() is not None:
        found = native.kv_quantize(x, bits, clip, code_bytes(x.shape[-1], bits), packs(bits))
        if found is not None:
            return found
    return kv_quantize_reference(x.contiguous(), bits, clip)


def kv_dequantize_reference(codes, scale, zero, bits: int, length: int, dtype: torch.dtype):
    check_bits(bits)
    q = unpack_int4_reference(codes, length).float() + 8 if packs(bits) else codes.float()
    return ((q - zero.float()) * scale).to(dtype)


def _dequantize_cpu(codes, scale, zero, bits: int, length: int, dtype: torch.dtype):
    """The C kernel where it was built and the scales are one per vector (the packed cache's
    layout), else the reference; the same bits either way."""
    from . import native

    check_bits(bits)
    if (codes.device.type != "cpu" or native.library() is None or scale.shape != (*codes.shape[:-1], 1)
            or zero.shape != scale.shape):
        return kv_dequantize_reference(codes, scale, zero, bits, length, dtype)
    return native.kv_dequantize(codes, scale, zero, length, packs(bits)).to(dtype)


@define_op("quarot_fx::kv_quantize", python_twin=True)
def kv_quantize(x: torch.Tensor, bits: int, clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes, float32 scale, float32 zero) of each last-dim vector of x."""
    return _quantize_cpu(x, bits, clip)


@kv_quantize.register_fake
def _(x, bits, clip):
    check_inputs(x, bits, clip, "kv_quantize")
    lead = x.shape[:-1]
    return (x.new_empty((*lead, code_bytes(x.shape[-1], bits)), dtype=torch.uint8),
            x.new_empty((*lead, 1), dtype=torch.float32), x.new_empty((*lead, 1), dtype=torch.float32))


@kv_quantize.register_kernel("cuda")
def _(x, bits, clip):
    from .triton_quant import triton_kv_quantize

    check_inputs(x, bits, clip, "kv_quantize")
    return triton_kv_quantize(x, bits, clip)


@define_op("quarot_fx::kv_dequantize")
def kv_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, length: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """(code - zero) · scale as ``dtype``, [..., length]."""
    return _dequantize_cpu(codes, scale, zero, bits, length, dtype)


@kv_dequantize.register_fake
def _(codes, scale, zero, bits, length, dtype):
    check_bits(bits)
    if codes.shape[-1] != code_bytes(length, bits):
        raise ValueError(f"kv_dequantize: {codes.shape[-1]} bytes do not hold {length} {bits}-bit codes")
    return codes.new_empty((*codes.shape[:-1], length), dtype=dtype)


@kv_dequantize.register_kernel("cuda")
def _(codes, scale, zero, bits, length, dtype):
    from .triton_quant import triton_kv_dequantize

    return triton_kv_dequantize(codes, scale, zero, bits, length, dtype)


# The op handles graph passes match and the packed cache calls: defined here, with the ops.
KV_QUANTIZE = torch.ops.quarot_fx.kv_quantize.default
KV_DEQUANTIZE = torch.ops.quarot_fx.kv_dequantize.default
