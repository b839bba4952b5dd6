"""The exact integer GEMMs' primitives, below both the ops and the tuner that chooses among them.

The packed int4 weight layout (``pack_linear_weight``, the *half-split* layout: in each group of
g inputs, byte j holds input j in its low nibble and input j + ⌈g/2⌉ in its high nibble), and the
exact ways to compute Σ_k qx·qw: float matmuls on integer-valued tensors (exact while the sum
stays below 2²⁴, float64 beyond: ``accumulator_dtype``), int64 einsum, and ``torch._int_mm``.
``quantized_linear`` runs them; ``int_gemm`` times them. Neither imports the other's module for them.

The candidates ``int_gemm`` chooses among are registered here (:func:`register_gemm`): ``int8``
(``torch._int_mm`` per group), ``float`` (the float32/float64 emulation) and, from ``native``,
``int4`` (the C kernels on the packed bytes). All compute the same exact sums, so the choice is
one of speed; the ``int_gemm`` option and ``QUAROT_FX_INT_GEMM`` accept any registered name.
"""

from __future__ import annotations

import sys

from collections.abc import Callable
from dataclasses import dataclass

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
    """int8 weight codes [N, K] → [K / group, group, N], the layout ``_int_mm`` reads; one group
    is a transposed view (``_int_mm`` reads it as fast as a copy, measured), not a copy."""
    n = codes.shape[0]
    if group == codes.shape[1]:
        return codes.T.unsqueeze(0)
    return codes.reshape(n, -1, group).permute(1, 2, 0).contiguous()


@dataclass(frozen=True)
class GemmCandidate:
    """One exact way to run ``quantized_linear`` on the CPU: either a GEMM on a prepared weight
    (``prepare`` then ``matmul``, inside the shared row-block loop and epilogue) or the whole
    linear on the packed bytes (``linear``)."""

    name: str
    applies: Callable[[int, int, int, int, bool], bool]  # (rows, in, out, group, dense packed weight)
    prepare: Callable | None = None  # (int8 weight codes [out, in], group, acc dtype) → what matmul reads
    matmul: Callable | None = None  # (int8 codes [rows, in], prepared, group, out, acc dtype) → exact sums:
    # [rows, out] for one group, written into ``out`` when it is given; [groups, rows, out] otherwise
    linear: Callable | None = None  # (int8 codes, scales [rows, 1], packed, weight scales, bias, in) → float32 y
    int32_sums: Callable | None = None  # (int8 codes, prepared one-group weight, int32 out) → the exact sums
    # written as int32 into out (the caller's float32 output, reinterpreted): the epilogue then runs in place


_CANDIDATES: dict[str, GemmCandidate] = {}


def register_gemm(name: str, applies, *, prepare=None, matmul=None, linear=None, int32_sums=None) -> GemmCandidate:
    """Add a CPU GEMM candidate: ``int_gemm`` times it with the others on each shape it ``applies``
    to, and ``int_gemm=name`` forces it. It must give the others' exact sums (tests compare).
    ``int32_sums`` (optional, with ``prepare``): the same sums as int32 into a given buffer."""
    if not isinstance(name, str) or not name or name == "auto" or name in _CANDIDATES:
        raise ValueError(f"GEMM candidate name must be new (not 'auto'); got {name!r}")
    if (linear is None) == (prepare is None or matmul is None):
        raise ValueError("give either prepare and matmul, or linear")
    if int32_sums is not None and prepare is None:
        raise ValueError("int32_sums goes with prepare")
    _CANDIDATES[name] = candidate = _changed(GemmCandidate(name, applies, prepare, matmul, linear, int32_sums))
    return candidate


def _changed(candidate=None):
    """Another set of candidates may decide a shape otherwise: the C++ kernels forget what the
    Python side handed over (``native_ops``; nothing was before it is imported), and ask again."""
    native_ops = sys.modules.get(f"{__package__}.native_ops")
    if hasattr(native_ops, "forget"):
        native_ops.forget()
    return candidate


def unregister_gemm(name: str) -> None:
    if name in ("int8", "float", "int4"):
        raise ValueError(f"{name!r} is built in")
    _CANDIDATES.pop(name, None)
    _changed()


def gemm_candidate(name: str) -> GemmCandidate:
    return _CANDIDATES[name]


def gemm_candidates() -> tuple[str, ...]:
    return tuple(_CANDIDATES)


def gemm_policies() -> tuple[str, ...]:
    """The values of the ``int_gemm`` option: "auto" (measure) or a registered candidate."""
    return ("auto", *_CANDIDATES)


INT32_LIMIT = 2**31
register_gemm("int8", lambda rows, k, n, group, dense: group * MAX_PRODUCT < INT32_LIMIT,
              prepare=lambda codes, group, dtype: transposed_groups(codes, group),
              matmul=lambda a, w, group, out, dtype: int8_matmul(a, w, group, out, dtype),
              int32_sums=lambda a, w, out: torch._int_mm(a.contiguous(), w[0], out=out))
register_gemm("float", lambda rows, k, n, group, dense: True,
              prepare=lambda codes, group, dtype: codes.to(dtype),
              matmul=lambda a, w, group, out, dtype: integer_matmul(a, w, group, out))
