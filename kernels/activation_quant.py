"""``quarot_fx::quantize_per_token``: per-token symmetric activation quantization.

Returns int8 codes [..., n] and float32 scales [..., 1] (scale = clip · max|x| / qmax, 1 for
an all-zero token), the input the integer linear needs. With ``hadamard_inner > 0`` the
online Hadamard ``hadamard_transform(x, hadamard_inner)`` is applied first, in the same op:
on CUDA one Triton kernel reads the activations once, rotates and quantizes them (see
``triton_quant``); on CPU, where the C stages run the Hadamard, one C call quantizes each block
of rows while it is still in the cache (``native.hadamard_codes``), elsewhere the two steps run
back to back; both round exactly like the unfused graph (the fake-quant path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quarot_fx.numerics.quant import activation_codes

from .common import check_inputs, define_op, row_chunks
from .hadamard_transform import hadamard_transform_cpu, hadamard_transform_reference


def _rotate_and_quantize(x: torch.Tensor, bits: int, clip: float, hadamard_inner: int, hadamard: Callable):
    """The op's semantics on one block of rows (also its Inductor decomposition, so no profiler
    ranges or in-place ops here)."""
    if hadamard_inner:
        x = hadamard(x, hadamard_inner)
    codes, scale = activation_codes(x, bits, clip)
    return codes.to(torch.int8), scale


def _profiled_hadamard(x: torch.Tensor, inner: int) -> torch.Tensor:
    with torch.profiler.record_function("quarot_fx::hadamard (fused)"):
        return hadamard_transform_cpu(x, inner)


def _quantize(x: torch.Tensor, bits: int, clip: float, hadamard_inner: int,
              hadamard: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Row block by row block, so rotation, scale and rounding of a block stay in cache."""
    check_inputs(x, bits, clip)
    n = x.shape[-1]
    flat = x.reshape(-1, n)
    codes = torch.empty(flat.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty((flat.shape[0], 1), dtype=torch.float32, device=x.device)
    for rows in row_chunks(flat.shape[0], 4 * n):
        codes[rows], scales[rows] = _rotate_and_quantize(flat[rows], bits, clip, hadamard_inner, hadamard)
    return codes.reshape(x.shape), scales.reshape(*x.shape[:-1], 1)


def _fused_on_cpu(x: torch.Tensor, bits: int, clip: float, hadamard_inner: int):
    """(codes, scales) from ``native.hadamard_codes`` where the C stages would run the Hadamard
    (float32 CPU rows, ``hadamard_transform_cpu``'s choice), else None."""
    from quarot_fx.numerics.quant import scale_divisor

    from . import native
    from .hadamard_transform import c_stages_plan

    if not hadamard_inner or x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] % hadamard_inner:
        return None
    flat = x.reshape(-1, x.shape[-1])
    plan = c_stages_plan(flat, hadamard_inner) if flat.shape[0] else None
    if plan is None:
        return None
    with torch.profiler.record_function("quarot_fx::hadamard (fused)"):
        found = native.hadamard_codes(flat, *plan, bits, scale_divisor(bits, clip))
    return None if found is None else (found[0].reshape(x.shape), found[1].reshape(*x.shape[:-1], 1))


def quantize_per_token_reference(x: torch.Tensor, bits: int, clip: float,
                                 hadamard_inner: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: dense Hadamard (float64), then per-token RTN in float32."""
    return _quantize(x, bits, clip, hadamard_inner, hadamard_transform_reference)


def _per_token(x: torch.Tensor, bits: int, clip: float, hadamard_inner: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    check_inputs(x, bits, clip)
    fused = _fused_on_cpu(x, bits, clip, hadamard_inner)
    return fused if fused is not None else _quantize(x, bits, clip, hadamard_inner, _profiled_hadamard)


def _per_token_fake(x, bits, clip, hadamard_inner=0):
    check_inputs(x, bits, clip)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _per_token_cuda(x, bits, clip, hadamard_inner=0):
    from .triton_quant import triton_quantize_per_token

    check_inputs(x, bits, clip)
    return triton_quantize_per_token(x, bits, clip, hadamard_inner)


@define_op("quarot_fx::quantize_per_token")
def quantize_per_token(x: torch.Tensor, bits: int, clip: float,
                       hadamard_inner: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 scales [..., 1]) of x, rotated first when ``hadamard_inner > 0``."""
    return _per_token(x, bits, clip, hadamard_inner)


@define_op("quarot_fx::hadamard_quantize")
def hadamard_quantize(x: torch.Tensor, bits: int, clip: float,
                      hadamard_inner: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_per_token`` as Inductor keeps it (no decomposition): where a graph's quantizer
    rotates more rows than a decode step's, its CPU decomposition is this op (see
    ``_decomposed_on_cpu``)."""
    return _per_token(x, bits, clip, hadamard_inner)


for _op in (quantize_per_token, hadamard_quantize):
    _op.register_fake(_per_token_fake)
    _op.register_kernel("cuda")(_per_token_cuda)


def _decomposed_on_cpu(x, bits, clip, hadamard_inner=0):
    """On CPU, hand Inductor the quantizer as aten ops: it fuses the scale reduction and the
    rounding into generated loops, faster than the op's chain of torch calls. Two exceptions keep
    the quantizer whole, as ``hadamard_quantize`` (an op without a decomposition): CUDA (the fused
    Triton kernel), and an online Hadamard over more rows than a decode step's where the C kernels
    are built (``native.hadamard_codes`` rotates and quantizes a prefill's rows in one pass, where
    the decomposition writes the rotated rows out and reads them twice). A decode step's rows keep
    the decomposition: the one call in place of two measured no faster there."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    from . import native

    rows = x.numel() // x.shape[-1] if x.dim() else 1
    if x.device.type != "cpu" or (hadamard_inner and x.dtype == torch.float32 and native.library() is not None
                                  and not statically_known_true(rows <= native.FEW_ROWS)):
        return torch.ops.quarot_fx.hadamard_quantize(x, bits, clip, hadamard_inner)
    return _rotate_and_quantize(x, bits, clip, hadamard_inner, torch.ops.quarot_fx.hadamard_transform)


def register_inductor_decompositions() -> None:
    """Add the CPU decomposition of ``quantize_per_token`` to Inductor's table (idempotent)."""
    from torch._inductor import decomposition as inductor

    op = torch.ops.quarot_fx.quantize_per_token.default
    if op not in inductor.decompositions:
        inductor.register_decomposition(op)(_decomposed_on_cpu)
        # Inductor memoizes the table it hands to AOT autograd: drop a copy made before us.
        getattr(inductor.fast_random_decomps, "cache_clear", lambda: None)()
