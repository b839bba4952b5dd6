"""Round-to-nearest quantizers: integer codes and scales, and their simulated (fake) form.

The integer kernels (``quarot_fx.kernels``) and the fake quantizers share the code and scale
functions here, so both paths round the same values the same way.

Conventions follow QuaRot: symmetric b-bit integers in [-2^(b-1), 2^(b-1) - 1] with scale
``clip · max|x| / (2^(b-1) - 1)``; asymmetric ones in [0, 2^b - 1] with a zero point. A
group (row, token, head) of zeros keeps scale 1 so it stays exactly zero.
"""

from __future__ import annotations

import torch

CLIP_GRID = 20  # candidate clip ratios of the weight clip search
MIN_CLIP = 0.5


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[..., n] → [..., n/group, group]; without a group the last dim is left as it is."""
    if group_size is None:
        return x
    if x.shape[-1] % group_size:
        raise ValueError(f"group size {group_size} does not divide the dimension {x.shape[-1]}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def scale_divisor(bits: int, clip: float) -> float:
    """qmax / clip: a scale is max|x| divided by it, one float32 rounding. Dividing once (rather than
    multiplying by clip, then dividing) makes clip = qmax / (qmax + ½) give exactly the scales of
    compressed-tensors' dynamic per-token quantization, max|x| / (qmax + ½) (quarot_fx.export)."""
    return (2 ** (bits - 1) - 1) / clip


def symmetric_scale(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """clip · max|x| / qmax over the last dim (kept), 1 where the group is all zeros.

    A NaN or Inf in the group makes its scale NaN or Inf, so the dequantized values (and every
    output computed from the codes and this scale) are non-finite, as in eager.
    """
    # max|x| as the ∞-norm: one pass instead of abs() then amax(); it propagates NaN.
    scale = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True) / scale_divisor(bits, clip)
    return unit_where_zero(scale)


def unit_where_zero(scale: torch.Tensor) -> torch.Tensor:
    """Scale 1 for an all-zero group (so it stays exactly zero); NaN and Inf are kept."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def symmetric_codes(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer-valued codes in [-2^(b-1), 2^(b-1) - 1] (same dtype as x)."""
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax)  # out of place: also an Inductor decomposition


def activation_codes(x: torch.Tensor, bits: int, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token codes (integer-valued float32) and float32 scales [..., 1]: what the integer
    op ``quantize_per_token`` returns, in plain float ops (the simulated linear's input)."""
    x = x.float()
    scale = symmetric_scale(x, bits, clip)
    return symmetric_codes(x, scale, bits), scale


def round_symmetric(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return symmetric_codes(x, scale, bits) * scale


def fake_quant_symmetric(x: torch.Tensor, bits: int, clip: float = 1.0,
                         group_size: int | None = None) -> torch.Tensor:
    """Symmetric RTN along the last dim (per row, or per group of ``group_size``)."""
    if bits >= 16:
        return x
    g = _grouped(x.float(), group_size)
    return round_symmetric(g, symmetric_scale(g, bits, clip), bits).reshape(x.shape).to(x.dtype)


def fake_quant_asymmetric(x: torch.Tensor, bits: int, clip: float = 1.0, group_size: int | None = None) -> torch.Tensor:
    """Asymmetric RTN with a zero point along the last dim (KV cache: group = head_dim)."""
    if bits >= 16:
        return x
    g = _grouped(x.float(), group_size)
    q, scale, zero = asymmetric_codes(g, bits, clip)
    return ((q - zero) * scale).reshape(x.shape).to(x.dtype)


def asymmetric_codes(x: torch.Tensor, bits: int, clip: float = 1.0):
    """(codes in [0, 2^b - 1], scale, zero point) along the last dim of a float32 tensor.

    The range always includes 0 (so zero is exact) and a constant row keeps scale 1; a row
    with a NaN gets a NaN scale and zero point, so it dequantizes to NaN.
    """
    levels = 2**bits - 1
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0) * clip  # amax/amin and clamp propagate NaN
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0) * clip
    scale = unit_where_zero((hi - lo) / levels)
    zero = torch.round(-lo / scale)
    return torch.clamp(torch.round(x / scale) + zero, 0, levels), scale, zero


def weight_scales(w: torch.Tensor, bits: int, group_size: int | None = None,
                  clip_search: bool = True) -> torch.Tensor:
    """Scales [out, groups, 1] of symmetric RTN on a [out, in] weight.

    With ``clip_search`` each row (group) takes the clip ratio in [0.5, 1] with the smallest
    squared reconstruction error; ratio 1 is a candidate, so it is never worse than no clip.
    """
    g = _grouped(w.float(), group_size or w.shape[1])
    best = symmetric_scale(g, bits)
    if clip_search:
        best_err = (round_symmetric(g, best, bits) - g).pow(2).sum(-1, keepdim=True)
        for ratio in torch.linspace(1.0, MIN_CLIP, CLIP_GRID)[1:].tolist():
            scale = symmetric_scale(g, bits, ratio)
            err = (round_symmetric(g, scale, bits) - g).pow(2).sum(-1, keepdim=True)
            best = torch.where(err < best_err, scale, best)
            best_err = torch.minimum(err, best_err)
    return best


def weight_codes_rtn(w: torch.Tensor, bits: int, group_size: int | None = None,
                     clip_search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric RTN of a [out, in] weight: int8 codes [out, in] and scales [out, groups]."""
    g = _grouped(w.float(), group_size or w.shape[1])
    scales = weight_scales(w, bits, group_size, clip_search)
    return symmetric_codes(g, scales, bits).reshape(w.shape).to(torch.int8), scales[..., 0]


def dequantize_weight(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes [out, in] times their group's scale (scales [out, groups]), in float32."""
    out, groups = scales.shape
    return (codes.float().reshape(out, groups, -1) * scales[..., None]).reshape(codes.shape)


def quantize_weight_rtn(w: torch.Tensor, bits: int, group_size: int | None = None,
                        clip_search: bool = True) -> torch.Tensor:
    """Per-output-channel (or per-group) symmetric RTN of a [out, in] weight, dequantized."""
    if bits >= 16:
        return w
    return dequantize_weight(*weight_codes_rtn(w, bits, group_size, clip_search)).to(w.dtype)


def quantize_activation(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """Per-token symmetric quantization of a linear layer's input (simulated)."""
    return fake_quant_symmetric(x, bits, clip)


def quantize_kv(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """Asymmetric quantization per token and head (x is [..., head_dim]) for the KV cache."""
    return fake_quant_asymmetric(x, bits, clip)
