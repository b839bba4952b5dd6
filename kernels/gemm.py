"""The exact integer GEMMs' primitives, below both the ops and the tuner that chooses among them.

The packed int4 weight layout (``pack_linear_weight``, the *half-split* layout: in each group of
g inputs, byte j holds input j in its low nibble and input j + ⌈g/2⌉ in its high nibble), and the
exact ways to compute Σ_k qx·qw: float matmuls on integer-valued tensors (exact while the sum
stays below 2²⁴, float64 beyond: ``accumulator_dtype``), int64 einsum, and ``torch._int_mm``.
``quantized_linear`` runs them; ``int_gemm`` times them. Neither imports the other's module for them.
"""

from __future__ import annotations

import torch

from .common import signed_nibbles

EXACT_FLOAT32 = 2**24
MAX_PRODUCT = 128 * 8  # |int8 activation code| · |int4 weight code|


def group_size(in_features: int, groups: int) -> int:
    """Inputs per weight group; groups must be even-sized so a byte never spans two groups."""
    if in_features % groups or (groups > 1 and (in_features // groups) % 2):
        raise ValueError(f"quantized_linear: {groups} groups must split {in_features} inputs into even groups")
    return in_features // groups


def pack_linear_weight(codes: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """int8 codes [out, in] in [-8, 7] → uint8 [out, ceil(in/2)] in the half-split layout."""
    if codes.dtype != torch.int8:
        raise TypeError(f"pack_linear_weight takes int8 codes in [-8, 7], got {codes.dtype}")
    out, in_features = codes.shape
    group = group_size(in_features, groups)
    half = (group + 1) // 2
    c = torch.nn.functional.pad(codes.reshape(out, groups, group), (0, 2 * half - group)).to(torch.int16)
    return ((c[..., :half] & 0xF) | ((c[..., half:] & 0xF) << 4)).to(torch.uint8).reshape(out, groups * half)


def unpack_linear_weight(packed: torch.Tensor, in_features: int, groups: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_linear_weight`: int8 codes [out, in]."""
    out = packed.shape[0]
    group = in_features // groups
    p = packed.reshape(out, groups, -1)
    low, high = signed_nibbles(p)
    return torch.cat([low, high], dim=-1)[..., :group].reshape(out, in_features)


def accumulator_dtype(group: int) -> torch.dtype:
    """float32 holds every partial sum exactly while group · 128 · 8 < 2²⁴; float64 beyond."""
    return torch.float32 if group * MAX_PRODUCT < EXACT_FLOAT32 else torch.float64


def integer_matmul(codes: torch.Tensor, weight_codes: torch.Tensor, group: int, out=None) -> torch.Tensor:
    """Exact Σ_k codes·weight_codes: [M, N] for one group (written to ``out`` if given), else
    [groups, M, N]; integer-valued floats. ``weight_codes`` is already in the accumulator dtype."""
    a = codes.to(weight_codes.dtype)
    if weight_codes.shape[1] == group:
        return torch.mm(a, weight_codes.T, out=out)
    rows, n = a.shape[0], weight_codes.shape[0]
    a = a.reshape(rows, -1, group).transpose(0, 1)  # [G, M, group]
    return torch.bmm(a, weight_codes.reshape(n, -1, group).permute(1, 2, 0))  # [G, group, N]


def int64_matmul(codes, weight_codes, group, out=None):
    a = codes.long().reshape(codes.shape[0], -1, group)
    b = weight_codes.long().reshape(weight_codes.shape[0], -1, group)
    return torch.einsum("mgk,ngk->gmn", a, b).double()


def int8_matmul(codes: torch.Tensor, weight_t: torch.Tensor, group: int, out=None, dtype=torch.float32):
    """Exact Σ_k codes·w by ``torch._int_mm`` per group: [M, N] for one group (into ``out`` if given),
    else [groups, M, N], as ``dtype`` floats. ``weight_t``: int8 [groups, group, N]."""
    if weight_t.shape[0] == 1:
        acc = torch._int_mm(codes.contiguous(), weight_t[0])
        return out.copy_(acc) if out is not None else acc.to(dtype)
    return torch.stack([torch._int_mm(codes[:, g * group:(g + 1) * group].contiguous(), weight_t[g])
                        for g in range(weight_t.shape[0])]).to(dtype)


def transposed_groups(codes: torch.Tensor, group: int) -> torch.Tensor:
    """int8 weight codes [N, K] → [K / group, group, N], the layout ``_int_mm`` reads."""
    n = codes.shape[0]
    return codes.reshape(n, -1, group).permute(1, 2, 0).contiguous()
