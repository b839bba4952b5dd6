"""``quarot_fx::quantized_linear``: y = x·Wᵀ + b with W held as packed int4 plus scales.

* ``weight``: uint8 [out, ceil(in/2)], two int4 codes per byte in the *half-split* layout of
  :func:`pack_linear_weight`: in each group of g inputs, byte j holds input j (low nibble) and
  input j + ⌈g/2⌉ (high nibble). Unpacking is then two contiguous halves per group (a block
  copy on CPU, two contiguous tile loads in Triton) instead of an element-wise interleave;
  ``weight_scale``: float32 [out, groups], one scale per output channel (groups = 1) or per
  group of ``in / groups`` inputs.
* ``x``: int8 codes [..., in] with ``x_scale`` float32 [..., 1] (from ``quantize_per_token``),
  or float activations with ``x_scale=None`` (weight-only: dequantize, float matmul).

Integer semantics: acc = Σ_k qx·qw per group is an exact integer; y = Σ_g acc_g·s_w,g·s_x + b.
CPU: a real int8 GEMM (``torch._int_mm``, int32 accumulation), a float32 matmul on
integer-valued tensors (exact while |acc| < 2²⁴, i.e. group · 128 · 8 < 2²⁴; float64 beyond) or
``native``'s C kernels on the packed bytes (a GEMV at 1..16 rows, a GEMM beyond), whichever ``int_gemm`` measures
faster on this CPU for the shape (``gemm``: "auto" | "int8" | "float" | "int4"); all give the
same bits. With one weight group and a float32 output, ``_int_mm`` writes its int32 sums into the
output's own bytes and one C pass (``native.int32_epilogue``) scales them there, where torch's
conversion, two scalings and the bias took four passes and a buffer. CUDA: the Triton GEMM in
``triton_linear``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from quarot_fx.numerics.quant import dequantize_weight

from . import int_gemm, native, native_ops  # noqa: F401  (native registers the "int4" candidate)
from .common import define_op, row_chunks
from .gemm import (EXACT_FLOAT32, MAX_PRODUCT, accumulator_dtype, gemm_candidate, group_size, int64_matmul,  # noqa: F401
                   integer_matmul, pack_linear_weight, transposed_groups, unpack_linear_weight)

def _check(x, x_scale, weight, weight_scale, bias, in_features) -> int:
    """Validate shapes and dtypes; returns the group size."""
    if weight.dtype != torch.uint8 or weight.dim() != 2:
        raise TypeError(f"quantized_linear: weight must be packed uint8 [out, in/2]; got {weight.dtype} {tuple(weight.shape)}")
    out_features = weight_scale.shape[0]
    if weight.shape != (out_features, (in_features + 1) // 2):
        raise ValueError(f"quantized_linear: weight {tuple(weight.shape)} does not hold [{out_features}, {in_features}] int4")
    return check_inputs(x, x_scale, weight_scale, bias, in_features)


def check_inputs(x, x_scale, weight_scale, bias, in_features) -> int:
    """Validate the activation, scales and bias against the weight's shape; returns the group size."""
    out_features, groups = weight_scale.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"quantized_linear: input has {x.shape[-1]} features, weight expects {in_features}")
    group = group_size(in_features, groups)
    if (x_scale is None) != x.is_floating_point():
        raise TypeError("quantized_linear: int8 codes need x_scale; float activations take x_scale=None")
    if x_scale is not None and x.dtype != torch.int8:
        raise TypeError(f"quantized_linear: activation codes must be int8; got {x.dtype}")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"quantized_linear: bias {tuple(bias.shape)} does not match {out_features} outputs")
    return group


LINEAR_CHUNK_BYTES = 1 << 22  # accumulator block: large enough for an efficient GEMM, small enough for cache


def _sum_groups(acc: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Σ_g acc_g·s_g over acc [G, M, N], group after group: a fixed order that Inductor keeps too
    (it may reorder a ``sum`` reduction), so the simulated path (``simulated_linear``) and the
    kernels round alike."""
    y = acc[0] * weight_scale[:, 0]
    for g in range(1, acc.shape[0]):
        y = y + acc[g] * weight_scale[:, g]
    return y


def _block(x2, x_scale, w, weight_scale, bias, group, matmul, out=None):
    """y for a block of rows of x; ``w`` is the prepared weight (dequantized floats when x is
    float, integer codes in the accumulator dtype otherwise)."""
    if x_scale is None:  # weight-only
        y = torch.mm(x2.to(w.dtype), w.T, out=out)
    else:
        acc = matmul(x2, w, group, out)
        y = acc.mul_(weight_scale[:, 0]) if acc.dim() == 2 else _sum_groups(acc, weight_scale)
        y.mul_(x_scale)
    return y.add_(bias) if bias is not None else y


_unpacked = WeakIdKeyDictionary()  # packed weight (by identity) → {form: (version, tensor)}


def _gemm_ready(weight: torch.Tensor, form: str, make, keep: bool) -> torch.Tensor:
    """The weight in the form a GEMM reads, made from the packed bytes on every call, or once and
    kept while the packed tensor lives and is unchanged (``keep``: memory for speed, see
    ``resident_weights``)."""
    if not keep:
        return make()
    forms = _unpacked.setdefault(weight, {})
    version, ready = forms.get(form, (None, None))
    if version != weight._version:
        ready = make()
        forms[form] = (weight._version, ready)
    return ready


def linear_from_codes(x, x_scale, weight, weight_scale, bias, in_features, out_dtype, matmul, acc_dtype,
                      gemm="float", keep_unpacked=False, codes=None) -> torch.Tensor:
    """Shared body: the weight is unpacked once, then row blocks of x are multiplied by it, each
    GEMM written straight into a float32 output and scaled there while the block is in cache.
    ``gemm`` (integer codes only): the int_gemm policy for the float emulation vs ``_int_mm``;
    ``keep_unpacked``: keep the unpacked weight between calls instead of unpacking each time;
    ``codes``: how to get the int8 codes [out, in] from ``weight`` when it is not the dense
    packed layout (compressed sparse storage, ``sparse_linear``; checked by its caller)."""
    dense = codes is None  # the packed layout the C int4 kernels read
    if dense:
        group = _check(x, x_scale, weight, weight_scale, bias, in_features)
        codes = lambda: unpack_linear_weight(weight, in_features, groups)  # noqa: E731
    else:
        group = check_inputs(x, x_scale, weight_scale, bias, in_features)
    lead, out_features, groups = x.shape[:-1], weight_scale.shape[0], weight_scale.shape[1]
    x2 = x.reshape(-1, in_features)
    choice = "float" if x_scale is None or gemm == "float" else int_gemm.decide(
        x2.shape[0], in_features, out_features, group, gemm, int4=dense, unpacks=not keep_unpacked).choice
    candidate = gemm_candidate(choice)
    if candidate.linear is not None:  # the whole linear on the packed bytes (the C kernels)
        if choice == "int4" and x2.shape[0] <= native.FEW_ROWS:  # the GEMV: later calls of this shape stay in C++
            native_ops.allow_gemv(x2.shape[0], in_features, out_features, gemm)
        y = candidate.linear(x2, x_scale.reshape(-1, 1), weight, weight_scale, bias, in_features)
        return y.to(out_dtype).reshape(*lead, out_features)
    out = torch.empty((x2.shape[0], out_features), dtype=out_dtype, device=x.device)
    acc_dtype = acc_dtype or accumulator_dtype(group)
    if x_scale is None:
        w = _gemm_ready(weight, "dequantized", lambda: dequantize_weight(codes(), weight_scale), keep_unpacked)
    else:
        x_scale = x_scale.reshape(-1, 1)
        if choice != "float":  # "float" is the emulation with the caller's matmul (int64 for the reference)
            matmul = lambda a, b, g, out=None: candidate.matmul(a, b, g, out, acc_dtype)  # noqa: E731
        w = _gemm_ready(weight, f"{choice} {acc_dtype}", lambda: candidate.prepare(codes(), group, acc_dtype),
                        keep_unpacked)
    if x_scale is not None and candidate.int32_sums is not None and groups == 1 and out_dtype == acc_dtype == torch.float32 \
            and native.library() is not None:
        # The sums as int32 into out's own bytes, then one C pass scales them there: no buffer, so
        # no row blocks either (one GEMM over all rows: 341-row blocks of a 2048x576->3072 GEMM
        # took 1.4x its time as one call).
        sums = candidate.int32_sums(x2, w, out.view(torch.int32))
        return native.int32_epilogue(sums, x_scale, weight_scale, bias).reshape(*lead, out_features)
    direct = out_dtype == (w.dtype if x_scale is None else acc_dtype) and groups == 1
    for rows in row_chunks(x2.shape[0], 4 * out_features, LINEAR_CHUNK_BYTES):
        y = _block(x2[rows], x_scale[rows] if x_scale is not None else None, w, weight_scale, bias, group,
                   matmul, out[rows] if direct else None)
        if not direct:
            out[rows] = y
    return out.reshape(*lead, out_features)


def quantized_linear_reference(x, x_scale, weight, weight_scale, bias, in_features, out_dtype) -> torch.Tensor:
    """Plain torch with int64 accumulation (slow, obviously exact)."""
    return linear_from_codes(x, x_scale, weight, weight_scale, bias, in_features, out_dtype, int64_matmul, torch.int64)


def simulated_linear(codes: torch.Tensor, x_scale: torch.Tensor, weight_codes: torch.Tensor,
                     weight_scale: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """``kernels="fake"``: the integer kernels' arithmetic in plain torch ops, for any device and
    lowering. Integer-valued float codes [..., in] times weight codes [out, in] (float, in the
    accumulator dtype) sum exactly in any order, then the scales follow in the emulation's order
    (``_block``), so the simulated path gives the integer path's bits; multiplying dequantized
    floats would round differently and flip codes downstream."""
    in_features = weight_codes.shape[1]
    group = in_features // weight_scale.shape[1]
    y = _block(codes.reshape(-1, in_features), x_scale.reshape(-1, 1), weight_codes, weight_scale, bias, group,
               integer_matmul)
    return y.to(out_dtype).reshape(*codes.shape[:-1], weight_codes.shape[0])


@define_op("quarot_fx::quantized_linear", python_twin=True)
def quantized_linear(x: torch.Tensor, x_scale: Optional[torch.Tensor], weight: torch.Tensor,
                     weight_scale: torch.Tensor, bias: Optional[torch.Tensor], in_features: int,
                     out_dtype: torch.dtype, gemm: str = "auto", keep_unpacked: bool = False) -> torch.Tensor:
    """x·Wᵀ + b from int8 activation codes (or float x) and packed int4 weights; see the module doc."""
    int_gemm.check_policy("gemm", gemm)
    return linear_from_codes(x, x_scale, weight, weight_scale, bias, in_features, out_dtype, integer_matmul, None,
                             gemm, keep_unpacked)


@quantized_linear.register_fake
def _(x, x_scale, weight, weight_scale, bias, in_features, out_dtype, gemm="auto", keep_unpacked=False):
    _check(x, x_scale, weight, weight_scale, bias, in_features)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


@quantized_linear.register_kernel("cuda")
def _(x, x_scale, weight, weight_scale, bias, in_features, out_dtype, gemm="auto", keep_unpacked=False):
    from .triton_linear import triton_w4a_linear

    _check(x, x_scale, weight, weight_scale, bias, in_features)
    if x_scale is None:  # weight-only: unpack with torch on the GPU, float matmul
        w = dequantize_weight(unpack_linear_weight(weight, in_features, weight_scale.shape[1]), weight_scale)
        y = x.float() @ w.T + (bias.float() if bias is not None else 0)
        return y.to(out_dtype)
    return triton_w4a_linear(x, x_scale, weight, weight_scale, bias, in_features, out_dtype)
