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


@int8_weight_linear.register_fake
def _(x, weight, scale, bias):
    _check(x, weight, scale, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
