"""``quarot_fx::int8_weight_linear``: y = x·(W·s)ᵀ + b with W int8 [n, k], one float32 scale per
output channel s [n, 1], and float activations: the 8-bit output head.

Why: at decode the head is a GEMV over the whole vocabulary (SmolLM2: 49152×576, 113 MB in float32),
more bytes than all the 4-bit layers together; int8 codes read a quarter of them. Activations stay
float (the head's input is not rotated into a quantization-friendly basis for free, and 8-bit
weights alone cost almost no perplexity).

CPU: up to ``native.FEW_ROWS`` rows the C kernel (threads split the channels; each dot product in
8 float32 lanes, a fixed order: ``int8_linear_reference`` repeats it, so the kernel is checked bit
for bit); more rows (prefill) multiply the float codes block by block and scale the result. Every
other device runs the blocked path.

``quarot_fx::int8_dynamic_linear`` (``quantize_lm_head="w8a8"``): the same weights, and the input's
rows rounded to int8 codes too (one scale per row), so the sums are integers: exact in any order,
the same bits on every path, and at decode a third of the float kernel's instructions per weight
(that kernel is bound by its int8 → float conversions, not by the bytes it reads).
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import define_op, row_chunks

LANES = 8  # native.c dot_int8


def _check(x, weight, scale, bias) -> None:
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise TypeError(f"int8_weight_linear: weight must be int8 [out, in]; got {weight.dtype} {tuple(weight.shape)}")
    if scale.shape != (weight.shape[0], 1):
        raise ValueError(f"int8_weight_linear: scale {tuple(scale.shape)} must be [{weight.shape[0]}, 1]")
    if x.shape[-1] != weight.shape[1] or not x.is_floating_point():
        raise ValueError(f"int8_weight_linear: input {x.dtype} {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"int8_weight_linear: bias {tuple(bias.shape)} does not match {weight.shape[0]} outputs")


def int8_channel_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit RTN of a [out, in] weight per output channel: (int8 codes, float32 scales [out, 1])."""
    from quarot_fx.numerics.quant import weight_codes_rtn

    return weight_codes_rtn(w, 8, None, clip_search=False)


def int8_linear_reference(x, weight, scale, bias=None) -> torch.Tensor:
    """The C kernel's arithmetic in torch, op for op: products in float32, lane j summing every
    8th product in order, the lanes in order, then the tail, times the scale, plus the bias."""
    _check(x, weight, scale, bias)
    k = weight.shape[1]
    products = x.reshape(-1, 1, k).float() * weight.float()  # [rows, n, k]
    whole = k - k % LANES
    lanes = torch.zeros(products.shape[:2] + (LANES,))
    for start in range(0, whole, LANES):
        lanes = lanes + products[..., start:start + LANES]
    total = torch.zeros(products.shape[:2])
    for j in range(LANES):
        total = total + lanes[..., j]
    for i in range(whole, k):
        total = total + products[..., i]
    y = total * scale[:, 0].float()
    y = y + bias.float() if bias is not None else y
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def _blocked(x2, weight, scale, bias) -> torch.Tensor:
    """Many rows: float codes of a block of channels at a time (bounded memory), then the scale."""
    out = torch.empty((x2.shape[0], weight.shape[0]), dtype=torch.float32, device=x2.device)
    x2 = x2.float()
    for channels in row_chunks(weight.shape[0], 4 * weight.shape[1], 1 << 24):
        block = x2 @ weight[channels].float().T
        block.mul_(scale[channels, 0].float())
        out[:, channels] = block.add_(bias[channels].float()) if bias is not None else block
    return out


@define_op("quarot_fx::int8_weight_linear", python_twin=True)
def int8_weight_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x·(weight·scale)ᵀ + bias in x's dtype; see the module doc."""
    from . import native

    _check(x, weight, scale, bias)
    x2 = x.reshape(-1, weight.shape[1])
    if x.device.type == "cpu" and x2.shape[0] <= native.FEW_ROWS and native.library() is not None:
        y = native.int8_weight_linear(x2, weight, scale, bias, torch.get_num_threads())
    else:
        y = _blocked(x2, weight, scale, bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def _head_fake(x, weight, scale, bias):
    _check(x, weight, scale, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


int8_weight_linear.register_fake(_head_fake)


# quantize_lm_head="w8a8": the head's activations in 8 bits too, one scale per row.

def head_activation_codes(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and float32 scales [rows, 1] of each row: symmetric, max|x| / 127, no clipping
    (``quantize_per_token``'s arithmetic at 8 bits)."""
    from quarot_fx.numerics.quant import activation_codes

    codes, x_scale = activation_codes(x2, 8, 1.0)
    return codes.to(torch.int8), x_scale


def _codes_epilogue(acc, x_scale, scale, bias) -> torch.Tensor:
    """(acc · scale) · x_scale (+ bias) in float32: the C kernel's order (native.c ``epilogue``)."""
    y = (acc.float() * scale[:, 0].float()) * x_scale
    return y + bias.float() if bias is not None else y


def int8_dynamic_linear_reference(x, weight, scale, bias=None) -> torch.Tensor:
    """Plain torch: the row codes, exact int64 sums, the epilogue."""
    _check(x, weight, scale, bias)
    codes, x_scale = head_activation_codes(x.reshape(-1, weight.shape[1]))
    y = _codes_epilogue(codes.long() @ weight.long().T, x_scale, scale, bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def _codes_blocked(codes, x_scale, weight, scale, bias) -> torch.Tensor:
    """Many rows: the integer sums as a float matmul of the codes, exact (float32 while every
    partial sum stays below 2²⁴, i.e. k · 128 · 128 < 2²⁴; float64 beyond), a block of channels at
    a time."""
    dtype = torch.float32 if weight.shape[1] * 128 * 128 < 2**24 else torch.float64
    out = torch.empty((codes.shape[0], weight.shape[0]), dtype=torch.float32, device=codes.device)
    a = codes.to(dtype)
    for channels in row_chunks(weight.shape[0], 4 * weight.shape[1], 1 << 24):
        out[:, channels] = _codes_epilogue(a @ weight[channels].to(dtype).T, x_scale, scale[channels],
                                           bias[channels] if bias is not None else None)
    return out


@define_op("quarot_fx::int8_dynamic_linear", python_twin=True)
def int8_dynamic_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                        bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The 8-bit head with 8-bit activations: x's rows to int8 codes (``head_activation_codes``),
    exact integer sums with the int8 weight, then ((sum · scale) · row scale) + bias. At decode
    (up to ``native.FEW_ROWS`` rows on a CPU) the C kernel ``int8_codes_linear``; more rows, and
    other devices, the exact float matmul of the codes. Every path: the same bits."""
    from . import native

    _check(x, weight, scale, bias)
    codes, x_scale = head_activation_codes(x.reshape(-1, weight.shape[1]))
    if x.device.type == "cpu" and codes.shape[0] <= native.FEW_ROWS and native.library() is not None:
        y = native.int8_codes_linear(codes, x_scale, weight, scale, bias, torch.get_num_threads())
    else:
        y = _codes_blocked(codes, x_scale, weight, scale, bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


int8_dynamic_linear.register_fake(_head_fake)
