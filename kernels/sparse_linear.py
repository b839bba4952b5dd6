"""``quarot_fx::sparse_quantized_linear``: ``quantized_linear`` on pruned 4-bit weights stored compressed.

Two formats, both ~3 bits per weight at 50 % sparsity (plus the float32 scale per row or group):

* ``"2:4"``: at most 2 nonzero codes in each group of 4 inputs. ``values`` uint8 [out, in/4]: the
  two kept codes of each group, packed two per byte (``pack_int4`` layout: group g's codes are
  bytes g, low then high nibble); ``meta`` uint8 [out, in/8]: their positions in the group,
  2 bits each (first kept in bits 0–1, second in bits 2–3 of a nibble; group 2j in the low
  nibble of byte j, group 2j+1 in the high one). 4 + 2 = 6 bits per 2 weights kept of 4.
* ``"bitmap"`` (unstructured, or any N:M): every row keeps the same number ``kept`` of positions.
  ``meta`` uint8 [out, ⌈in/8⌉]: bit j % 8 of byte j // 8 says input j is kept; ``values`` uint8
  [out, ⌈kept/2⌉]: the kept codes in input order, packed two per byte. At 50 %: 1 + 2 bits per
  weight. Why a bitmap: a column index per kept weight (CSR) costs ⌈log₂ in⌉ ≥ 10 bits here,
  i.e. ≥ 5 bits per weight at 50 %, and a bitmap costs 1 bit per weight at any density.

Kept positions are where the mask kept a weight; a kept weight that rounded to code 0 is stored
as a 0, so the compressed form can be built from the codes alone as long as no row (or 2:4
group) has more nonzeros than it keeps. The CPU kernel decompresses to the dense int8 codes and
runs the dense integer GEMM, so its output equals the dense path's bit for bit; CUDA
decompresses with Triton (``triton_sparse``) and runs the dense Triton GEMM.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import define_op
from .int4 import pack_int4_reference, unpack_int4_reference
from .quantized_linear import check_inputs, integer_matmul, linear_from_codes, pack_linear_weight

FORMATS = ("2:4", "bitmap")


def _positions(codes: torch.Tensor, kept: int, where: str) -> torch.Tensor:
    """Per row of ``codes`` [..., n]: ``kept`` positions in increasing order covering every nonzero."""
    nonzero = codes != 0
    if (nonzero.sum(-1) > kept).any():
        raise ValueError(f"sparse storage: a {where} has more than {kept} nonzero codes; "
                         "the weight does not have the sparsity pattern it is stored with")
    first = torch.argsort((~nonzero).to(torch.int8), dim=-1, stable=True)[..., :kept]  # nonzeros first
    return first.sort(dim=-1).values


def compress_24(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [out, in] (in % 8 == 0, ≤ 2 nonzeros per group of 4) → (values, meta)."""
    out, n = codes.shape
    if n % 8:
        raise ValueError(f"2:4 storage needs the input width to be a multiple of 8; got {n}")
    groups = codes.reshape(out, n // 4, 4)
    position = _positions(groups, 2, "group of 4 inputs")  # [out, G, 2]
    values = pack_int4_reference(torch.gather(groups, 2, position).reshape(out, n // 2))
    nibble = (position[..., 0] | (position[..., 1] << 2)).to(torch.uint8)  # [out, G]
    return values, nibble[:, 0::2] | (nibble[:, 1::2] << 4)


def decompress_24(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    out = values.shape[0]
    kept = unpack_int4_reference(values, in_features // 2).reshape(out, in_features // 4, 2)
    nibble = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(out, in_features // 4)
    position = torch.stack([nibble & 3, (nibble >> 2) & 3], dim=-1).long()
    dense = torch.zeros(out, in_features // 4, 4, dtype=torch.int8, device=values.device)
    return dense.scatter_(2, position, kept).reshape(out, in_features)


BITS = 1 << torch.arange(8, dtype=torch.uint8)


def compress_bitmap(codes: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [out, in] with ≤ ``kept`` nonzeros per row → (values, meta)."""
    out, n = codes.shape
    position = _positions(codes, kept, "row")
    values = pack_int4_reference(torch.gather(codes, 1, position))
    mask = torch.zeros(out, -(-n // 8) * 8, dtype=torch.bool, device=codes.device).scatter_(1, position, True)
    meta = (mask.reshape(out, -1, 8).to(torch.uint8) * BITS.to(codes.device)).sum(-1, dtype=torch.uint8)
    return values, meta


def decompress_bitmap(values: torch.Tensor, meta: torch.Tensor, in_features: int, kept: int) -> torch.Tensor:
    out = values.shape[0]
    mask = ((meta[..., None] & BITS.to(meta.device)) != 0).reshape(out, -1)[:, :in_features]
    position = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :kept]
    dense = torch.zeros(out, in_features, dtype=torch.int8, device=values.device)
    return dense.scatter_(1, position, unpack_int4_reference(values, kept))


def compress(codes: torch.Tensor, format: str, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    if format == "2:4":
        return compress_24(codes)
    if format == "bitmap":
        return compress_bitmap(codes, kept)
    raise ValueError(f"sparse storage format must be one of {FORMATS}; got {format!r}")


def decompress(values, meta, in_features: int, format: str, kept: int) -> torch.Tensor:
    """The dense int8 codes [out, in] a compressed weight holds."""
    if format == "2:4":
        return decompress_24(values, meta, in_features)
    if format == "bitmap":
        return decompress_bitmap(values, meta, in_features, kept)
    raise ValueError(f"sparse storage format must be one of {FORMATS}; got {format!r}")


def _check_sparse(values, meta, weight_scale, in_features, format, kept) -> None:
    out = weight_scale.shape[0]
    expected = {"2:4": ((out, in_features // 4), (out, in_features // 8)),
                "bitmap": ((out, (kept + 1) // 2), (out, -(-in_features // 8)))}
    if format not in expected:
        raise ValueError(f"sparse_quantized_linear: format must be one of {FORMATS}; got {format!r}")
    if values.dtype != torch.uint8 or meta.dtype != torch.uint8 or (tuple(values.shape), tuple(meta.shape)) != expected[format]:
        raise ValueError(f"sparse_quantized_linear: {format} storage of [{out}, {in_features}] needs uint8 values "
                         f"{expected[format][0]} and meta {expected[format][1]}; got {values.dtype} "
                         f"{tuple(values.shape)} and {meta.dtype} {tuple(meta.shape)}")


@define_op("quarot_fx::sparse_quantized_linear")
def sparse_quantized_linear(x: torch.Tensor, x_scale: Optional[torch.Tensor], values: torch.Tensor,
                            meta: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                            in_features: int, out_dtype: torch.dtype, format: str, kept: int,
                            gemm: str = "auto", keep_unpacked: bool = False) -> torch.Tensor:
    """x·Wᵀ + b with W stored compressed (see the module doc); the same bits as ``quantized_linear``
    on the dense packed weight."""
    _check_sparse(values, meta, weight_scale, in_features, format, kept)
    return linear_from_codes(x, x_scale, values, weight_scale, bias, in_features, out_dtype, integer_matmul, None,
                             gemm, keep_unpacked, codes=lambda: decompress(values, meta, in_features, format, kept))


@sparse_quantized_linear.register_fake
def _(x, x_scale, values, meta, weight_scale, bias, in_features, out_dtype, format, kept, gemm="auto",
      keep_unpacked=False):
    _check_sparse(values, meta, weight_scale, in_features, format, kept)
    check_inputs(x, x_scale, weight_scale, bias, in_features)
    return x.new_empty((*x.shape[:-1], weight_scale.shape[0]), dtype=out_dtype)


@sparse_quantized_linear.register_kernel("cuda")
def _(x, x_scale, values, meta, weight_scale, bias, in_features, out_dtype, format, kept, gemm="auto",
      keep_unpacked=False):
    from .quantized_linear import quantized_linear
    from .triton_sparse import triton_decompress_24

    _check_sparse(values, meta, weight_scale, in_features, format, kept)
    codes = (triton_decompress_24(values, meta, in_features) if format == "2:4"
             else decompress_bitmap(values, meta, in_features, kept))
    return quantized_linear(x, x_scale, pack_linear_weight(codes, weight_scale.shape[1]), weight_scale, bias,
                            in_features, out_dtype)
