"""``quarot_fx::packed_attention``: scaled dot-product attention that reads the packed KV cache.

``packed_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, length, dtype,
attn_mask, scale, is_causal, enable_gqa)`` is ``scaled_dot_product_attention(q,
kv_dequantize(k…), kv_dequantize(v…), …)``: ``passes/packed_attention.py`` puts it where the graph
dequantizes a layer's whole cache only for attention to read it. For a decode step (≤
``native.FEW_ROWS`` query rows, float32, with or without a mask) the C kernel dequantizes one block of
tokens at a time into a small buffer and folds it into an online softmax, so the cache never exists in
float and is read once; elsewhere (prefill, other dtypes, CUDA) it dequantizes and calls
SDPA, as the graph did before. The two agree to float rounding (their sums run in other orders).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .common import check_bits, define_op
from .common import kv_packs as packs

def packed_attention_reference(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, length, dtype,
                               attn_mask=None, scale=None, is_causal=False, enable_gqa=False):
    """Dequantize the whole cache, then SDPA: what the graph computed before the fusion."""
    dequantize = torch.ops.quarot_fx.kv_dequantize
    keys = dequantize(k_codes, k_scale, k_zero, bits, length, dtype)
    values = dequantize(v_codes, v_scale, v_zero, bits, length, dtype)
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, scale=scale,
                                                            is_causal=is_causal, enable_gqa=enable_gqa)


def _mask_fits(mask: torch.Tensor, shape: tuple) -> bool:
    """A boolean or float32 mask that broadcasts to [batch, q_heads, rows, tokens] (what the C
    kernel reads)."""
    if mask.dtype not in (torch.bool, torch.float32) or mask.dim() > 4 or mask.device.type != "cpu":
        return False
    return all(m in (1, s) for m, s in zip(reversed(mask.shape), reversed(shape)))


def takes_kernel(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, length, dtype, attn_mask, enable_gqa) -> bool:
    """Whether the C kernel covers this call (else the reference runs)."""
    from . import native

    if q.device.type != "cpu" or q.dim() != 4 or k_codes.dim() != 4:
        return False
    if attn_mask is not None and not _mask_fits(attn_mask, (*q.shape[:3], k_codes.shape[2])):
        return False
    if q.dtype != torch.float32 or dtype != torch.float32 or not 1 <= q.shape[2] <= native.FEW_ROWS or q.shape[3] != length:
        return False
    return _one_scale_per_vector(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, enable_gqa) \
        and native.library() is not None


def _one_scale_per_vector(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, enable_gqa) -> bool:
    """The cache layout the C kernels read: codes [batch, kv_heads, tokens > 0, bytes], the same for
    keys and values, one scale and zero point per vector, and query heads that are the kv heads or
    (``enable_gqa``) groups of them."""
    batch, q_heads = q.shape[:2]
    kv_heads, tokens = k_codes.shape[1:3]
    same = all(t.shape[:3] == k_codes.shape[:3] for t in (k_scale, k_zero, v_codes, v_scale, v_zero))
    vectors = all(t.shape[3] == 1 for t in (k_scale, k_zero, v_scale, v_zero)) and v_codes.shape == k_codes.shape
    heads = q_heads == kv_heads or (enable_gqa and kv_heads and q_heads % kv_heads == 0)
    return same and vectors and bool(heads) and k_codes.shape[0] == batch and tokens > 0


@define_op("quarot_fx::packed_attention", python_twin=True)
def packed_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                     v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, bits: int, length: int,
                     dtype: torch.dtype, attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     is_causal: bool = False, enable_gqa: bool = False) -> torch.Tensor:
    """SDPA over the dequantized cache; see the module doc."""
    from . import native

    check_bits(bits)
    if (attn_mask is not None and is_causal) or not takes_kernel(q, k_codes, k_scale, k_zero, v_codes, v_scale,
                                                                v_zero, length, dtype, attn_mask, enable_gqa):
        return packed_attention_reference(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, length, dtype,
                                          attn_mask, scale, is_causal, enable_gqa)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return native.packed_attention(q, (k_codes, k_scale, k_zero), (v_codes, v_scale, v_zero), length, packs(bits),
                                   scale, is_causal, attn_mask)


@packed_attention.register_fake
def packed_attention_fake(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, length, dtype, attn_mask=None,
                          scale=None, is_causal=False, enable_gqa=False):
    check_bits(bits)
    return q.new_empty((*q.shape[:-1], length))


def int8_query_attention_reference(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, length, dtype,
                                   attn_mask=None, scale=None, is_causal=False, enable_gqa=False):
    """``packed_attention_reference`` with the queries rounded to int8 per row first (symmetric,
    scale max|q| / 127, half to even: ``fake_quant_symmetric``): what ``int8_query_attention``'s C
    kernel computes (to float rounding; its Q·Kᵀ sums are exact)."""
    from quarot_fx.numerics.quant import fake_quant_symmetric

    return packed_attention_reference(fake_quant_symmetric(q, 8), k_codes, k_scale, k_zero,
                                      v_codes, v_scale, v_zero, bits, length, dtype, attn_mask, scale, is_causal,
                                      enable_gqa)


def takes_int8_kernel(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, length, dtype, attn_mask,
                      is_causal, enable_gqa) -> bool:
    """Whether ``int8_query_attention``'s C kernel covers this call: a prefill (more than
    ``native.FEW_ROWS`` query rows) of float32 CPU queries over a 4-bit packed cache, causal or
    unmasked, head size a multiple of 8, on a CPU with AVX2."""
    from . import native

    if attn_mask is not None or not 1 <= bits <= 4 or length % 8 or q.dim() != 4 or q.shape[2] <= native.FEW_ROWS:
        return False
    if q.dtype != torch.float32 or dtype != torch.float32 or q.device.type != "cpu" or q.shape[3] != length:
        return False
    if k_codes.dim() != 4 or k_codes.shape[3] * 2 != length:
        return False
    return _one_scale_per_vector(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, enable_gqa) \
        and native.library() is not None and bool(native.library().gemm_available())


@define_op("quarot_fx::int8_query_attention")
def int8_query_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor,
                         v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, bits: int, length: int,
                         dtype: torch.dtype, attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                         is_causal: bool = False, enable_gqa: bool = False) -> torch.Tensor:
    """``packed_attention`` whose prefill computes Q·Kᵀ in integers (``prefill_attention="int8"``):
    where ``takes_int8_kernel``, the queries are rounded to int8 per row and multiplied with the
    4-bit key codes exactly (``native.c int8_query_attention``; ``int8_query_attention_reference``
    is its definition); the weights and values stay float32. Every other call (a decode step, a
    mask, another dtype or device) is ``packed_attention``'s, in float."""
    from . import native

    check_bits(bits)
    if takes_int8_kernel(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, length, dtype, attn_mask,
                         is_causal, enable_gqa):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        out = native.int8_query_attention(q, (k_codes, k_scale, k_zero), (v_codes, v_scale, v_zero), scale, is_causal)
        if out is not None:
            return out
    return torch.ops.quarot_fx.packed_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, length,
                                                dtype, attn_mask, scale, is_causal, enable_gqa)


int8_query_attention.register_fake(packed_attention_fake)
