"""``quarot_fx::quantize_per_token``: per-token symmetric activation quantization.

Returns int8 codes [..., n] and float32 scales [..., 1] (scale = clip · max|x| / qmax, 1 for
an all-zero token), the input the integer linear needs. With ``hadamard_inner > 0`` the
online Hadamard ``hadamard_transform(x, hadamard_inner)`` is applied first, in the same op:
on CUDA one Triton kernel reads the activations once, rotates and quantizes them (see
``triton_quant``); on CPU the two steps run back to back and round exactly like the
unfused graph (the fake-quant path).
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


def quantize_per_token_reference(x: torch.Tensor, bits: int, clip: float,
                                 hadamard_inner: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: dense Hadamard (float64), then per-token RTN in float32."""
    return _quantize(x, bits, clip, hadamard_inner, hadamard_transform_reference)


@define_op("quarot_fx::quantize_per_token")
def quantize_per_token(x: torch.Tensor, bits: int, clip: float,
                       hadamard_inner: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 scales [..., 1]) of x, rotated first when ``hadamard_inner > 0``."""
    return _quantize(x, bits, clip, hadamard_inner, _profiled_hadamard)


@quantize_per_token.register_fake
def _(x, bits, clip, hadamard_inner=0):
    check_inputs(x, bits, clip)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@quantize_per_token.register_kernel("cuda")
def _(x, bits, clip, hadamard_inner=0):
    from .triton_quant import triton_quantize_per_token

    check_inputs(x, bits, clip)
    return triton_quantize_per_token(x, bits, clip, hadamard_inner)


def _decomposed_on_cpu(x, bits, clip, hadamard_inner=0):
    """On CPU, hand Inductor the quantizer as aten ops: it fuses the scale reduction and the
    rounding into generated loops, faster than the op's chain of torch calls. Elsewhere (CUDA:
    the fused Triton kernel) decline, so the op stays."""
    if x.device.type != "cpu":
        return NotImplemented
    return _rotate_and_quantize(x, bits, clip, hadamard_inner, torch.ops.quarot_fx.hadamard_transform)


def register_inductor_decompositions() -> None:
    """Add the CPU decomposition of ``quantize_per_token`` to Inductor's table (idempotent)."""
    from torch._inductor import decomposition as inductor

    op = torch.ops.quarot_fx.quantize_per_token.default
    if op not in inductor.decompositions:
        inductor.register_decomposition(op)(_decomposed_on_cpu)
        # Inductor memoizes the table it hands to AOT autograd: drop a copy made before us.
        getattr(inductor.fast_random_decomps, "cache_clear", lambda: None)()
