"""int4 packing: two signed 4-bit values per byte, ``quarot_fx::pack_int4`` / ``unpack_int4``.

Layout: along the last dim, element 2i goes to the low nibble of byte i and element 2i+1
to the high nibble, both as two's complement in [-8, 7]; an odd length is padded with a
zero nibble. The CPU kernels are plain torch; the CUDA kernels are Triton (see
``triton_int4``), proved bit-exact against these under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from .common import check_int4_values as _check_values
from .common import define_op, signed_nibbles


def pack_int4_reference(q: torch.Tensor) -> torch.Tensor:
    _check_values(q)
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4_reference(packed: torch.Tensor, length: int) -> torch.Tensor:
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 takes uint8 bytes, got {packed.dtype}")
    if not 2 * packed.shape[-1] - 1 <= length <= 2 * packed.shape[-1]:
        raise ValueError(f"length {length} does not fit {packed.shape[-1]} packed bytes")
    low, high = signed_nibbles(packed)
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])[..., :length]


@define_op("quarot_fx::pack_int4")
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] → uint8 bytes, two per byte along the last dim."""
    return pack_int4_reference(q.contiguous())


@pack_int4.register_fake
def _(q: torch.Tensor) -> torch.Tensor:
    _check_values(q)
    return q.new_empty((*q.shape[:-1], (q.shape[-1] + 1) // 2), dtype=torch.uint8)


@pack_int4.register_kernel("cuda")
def _(q: torch.Tensor) -> torch.Tensor:
    from .triton_int4 import triton_pack_int4

    return triton_pack_int4(q)


@define_op("quarot_fx::unpack_int4")
def unpack_int4(packed: torch.Tensor, length: int) -> torch.Tensor:
    """uint8 bytes → the ``length`` int8 values they hold along the last dim."""
    return unpack_int4_reference(packed.contiguous(), length)


@unpack_int4.register_fake
def _(packed: torch.Tensor, length: int) -> torch.Tensor:
    return packed.new_empty((*packed.shape[:-1], length), dtype=torch.int8)


@unpack_int4.register_kernel("cuda")
def _(packed: torch.Tensor, length: int) -> torch.Tensor:
    from .triton_int4 import triton_unpack_int4

    return triton_unpack_int4(packed, length)
