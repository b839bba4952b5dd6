"""Triton kernels for int4 pack/unpack (the CUDA path of ``kernels/int4.py``).

Rows are the leading dims flattened; one program handles BLOCK bytes of one row. Proved
bit-exact against the torch reference under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_int4_values as _check_values
from .triton_common import signed_nibble


@triton.jit
def _pack_kernel(q_ptr, out_ptr, length, n_bytes, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < n_bytes
    lo = tl.load(q_ptr + row * length + 2 * offs, mask=in_row & (2 * offs < length), other=0).to(tl.int32)
    hi = tl.load(q_ptr + row * length + 2 * offs + 1, mask=in_row & (2 * offs + 1 < length), other=0).to(tl.int32)
    byte = (lo & 0xF) | ((hi & 0xF) << 4)
    tl.store(out_ptr + row * n_bytes + offs, byte.to(tl.uint8), mask=in_row)


@triton.jit
def _unpack_kernel(p_ptr, out_ptr, length, n_bytes, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    byte = tl.load(p_ptr + row * n_bytes + offs, mask=offs < n_bytes, other=0).to(tl.int32)
    lo = signed_nibble(byte)
    hi = signed_nibble(byte >> 4)
    tl.store(out_ptr + row * length + 2 * offs, lo.to(tl.int8), mask=(offs < n_bytes) & (2 * offs < length))
    tl.store(out_ptr + row * length + 2 * offs + 1, hi.to(tl.int8), mask=(offs < n_bytes) & (2 * offs + 1 < length))


def triton_pack_int4(q: torch.Tensor, block: int = 64) -> torch.Tensor:
    _check_values(q)
    q = q.contiguous()
    length = q.shape[-1]
    n_bytes = (length + 1) // 2
    rows = q.numel() // max(length, 1)
    out = torch.empty((*q.shape[:-1], n_bytes), dtype=torch.uint8, device=q.device)
    _pack_kernel[(rows, triton.cdiv(n_bytes, block))](q, out, length, n_bytes, BLOCK=block)
    return out


def triton_unpack_int4(packed: torch.Tensor, length: int, block: int = 64) -> torch.Tensor:
    packed = packed.contiguous()
    n_bytes = packed.shape[-1]
    if not 2 * n_bytes - 1 <= length <= 2 * n_bytes:
        raise ValueError(f"length {length} does not fit {n_bytes} packed bytes")
    rows = packed.numel() // max(n_bytes, 1)
    out = torch.empty((*packed.shape[:-1], length), dtype=torch.int8, device=packed.device)
    _unpack_kernel[(rows, triton.cdiv(n_bytes, block))](packed, out, length, n_bytes, BLOCK=block)
    return out
