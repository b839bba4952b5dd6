"""Triton decompression of 2:4 compressed int4 weights (the CUDA path of ``sparse_linear``).

One program decodes BLOCK groups of 4 inputs of one row: the group's byte of values (two codes)
and its nibble of positions, written as 4 dense int8 codes. Proved bit-exact against
``decompress_24`` under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import signed_nibble


@triton.jit
def _decompress_24_kernel(values_ptr, meta_ptr, out_ptr, groups, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    group = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = group < groups
    byte = tl.load(values_ptr + row * groups + group, mask=live, other=0).to(tl.int32)
    first, second = signed_nibble(byte), signed_nibble(byte >> 4)
    packed = tl.load(meta_ptr + row * (groups // 2) + group // 2, mask=live, other=0).to(tl.int32)
    nibble = (packed >> (4 * (group % 2))) & 0xF
    at_first, at_second = nibble & 3, (nibble >> 2) & 3
    slot = tl.arange(0, 4)
    code = tl.where(slot[None, :] == at_first[:, None], first[:, None],
                    tl.where(slot[None, :] == at_second[:, None], second[:, None], 0))
    offsets = row * groups * 4 + group[:, None] * 4 + slot[None, :]
    tl.store(out_ptr + offsets, code.to(tl.int8), mask=live[:, None])


def triton_decompress_24(values: torch.Tensor, meta: torch.Tensor, in_features: int, block: int = 32) -> torch.Tensor:
    values, meta = values.contiguous(), meta.contiguous()
    rows, groups = values.shape[0], in_features // 4
    out = torch.empty((rows, in_features), dtype=torch.int8, device=values.device)
    _decompress_24_kernel[(rows, triton.cdiv(groups, block))](values, meta, out, groups, BLOCK=block)
    return out
