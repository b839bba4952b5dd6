"""Every instruction-set variant of the C kernels (``native.VARIANTS``) that this CPU can run gives
the reference's bits: the int4 GEMV and GEMM against the int64 reference, the KV quantizer and
dequantizer against theirs, the 8-bit head against its op-for-op reference, the Hadamard stages
the same across variants (and close to the dense reference), packed attention and its int8-query
prefill kernel the same across the SIMD variants (to float rounding on AVX512-BF16). A variant this CPU lacks is skipped with the reason; the dispatch itself (which
variant loads, ``QUAROT_FX_ISA``) is tested everywhere."""

from __future__ import annotations

import pytest
import torch

from quarot_fx.kernels import int_gemm, native, native_ops
from quarot_fx.kernels.activation_quant import quantize_per_token
from quarot_fx.kernels.hadamard_transform import hadamard_transform_cpu, hadamard_transform_reference
from quarot_fx.numerics.quant import activation_codes
from quarot_fx.kernels.int8_linear import (int8_channel_codes, int8_dynamic_linear, int8_dynamic_linear_reference,
                                          int8_linear_reference, int8_weight_linear)
from quarot_fx.kernels.kv_quant import kv_dequantize_reference, kv_quantize, kv_quantize_reference, kv_dequantize
from quarot_fx.kernels.packed_attention import int8_query_attention, packed_attention
from quarot_fx.kernels.quantized_linear import pack_linear_weight, quantized_linear, quantized_linear_reference
from test_quant_kernels import linear_inputs

NAMES = [name for name, _, _ in native.VARIANTS]
pytestmark = pytest.mark.usefixtures("python_bodies")  # the ops' Python bodies call the patched library


def variant_library(name: str):
    if not native.cpu_supports(name):
        pytest.skip(f"this CPU lacks the features of the {name} kernels")
    lib = native.load_variant(name)
    if lib is None:
        pytest.skip(f"the {name} kernels did not build here: {native.unavailable_reason()}")
    return lib


@pytest.fixture(params=NAMES)
def variant(request, monkeypatch):
    """Every kernel call in the test goes to variant ``request.param``'s library."""
    lib = variant_library(request.param)
    assert lib.isa_variant().decode() == request.param
    monkeypatch.setattr(native, "library", lambda: lib)
    int_gemm.forget()  # decisions name the kernels of the library they were made with
    yield request.param
    int_gemm.forget()


def test_int4_gemv_and_gemm_give_the_float_emulations_bits(variant):
    """The float32 emulation of the integer sums (exact) with the kernels' epilogue: the bits every
    GEMM path gives (the int64 reference agrees to rounding, its epilogue runs in another dtype)."""
    for rows, k, n in ((1, 576, 40), (1, 130, 17), (1, 1536, 7), (3, 130, 17), (16, 64, 33), (40, 96, 24), (5, 1536, 9)):
        codes, x_scale, w, w_scale, b = linear_inputs(rows, k, n, 1, seed=rows + k)
        args = (codes, x_scale, pack_linear_weight(w, 1), w_scale, b, k, torch.float32)
        chosen = int_gemm.decide(rows, k, n, k, "int4").choice
        assert chosen == "int4" or (variant == "generic" and rows > native.FEW_ROWS), (variant, rows, chosen)
        y = quantized_linear(*args, "int4")
        assert torch.equal(y, quantized_linear(*args, "float")), (rows, k, n)
        torch.testing.assert_close(y, quantized_linear_reference(*args))


def test_kv_quantize_and_dequantize_give_the_references_bits(variant):
    x = torch.randn(2, 3, 7, 64) * torch.linspace(0.1, 5, 64)
    for bits in (4, 8):
        codes, scale, zero = kv_quantize(x, bits, 0.95)
        expected = kv_quantize_reference(x, bits, 0.95)
        assert all(torch.equal(a, e) for a, e in zip((codes, scale, zero), expected))
        assert torch.equal(kv_dequantize(codes, scale, zero, bits, 64, torch.float32),
                           kv_dequantize_reference(codes, scale, zero, bits, 64, torch.float32))


def test_a_prefills_kv_quantization_on_threads_gives_the_references_bits(variant):
    """Thousands of vectors (split over threads), lengths with and without a tail past the 8-lane
    loop (an odd one leaves a half byte), rows all negative, constant, zero or huge, and a
    non-finite value in a late row (the kernel declines; the reference decides)."""
    g = torch.Generator().manual_seed(3)
    for length in (64, 70, 67, 8, 5):
        x = torch.randn(1, 3, 1100, length, generator=g) * torch.linspace(0.1, 6, length)
        x[0, 0, 1] = -x[0, 0, 1].abs()
        x[0, 0, 2] = 0.75
        x[0, 0, 3] = 0.0
        x[0, 1, 4] *= 1e30
        for bits in (4, 8):
            codes, scale, zero = native.kv_quantize(x, bits, 0.95, (length + 1) // 2 if bits <= 4 else length, bits <= 4)
            expected = kv_quantize_reference(x, bits, 0.95)
            assert all(torch.equal(a, e) for a, e in zip((codes, scale, zero), expected)), (length, bits)
        bad = x.clone()
        bad[0, 2, 1099, length // 2] = float("inf")
        assert native.kv_quantize(bad, 4, 0.95, (length + 1) // 2, True) is None
        assert all(torch.equal(a, e) for a, e in zip(kv_quantize(bad, 4, 0.95), kv_quantize_reference(bad, 4, 0.95)))


def test_the_w8a8_head_gives_its_references_bits(variant):
    w = torch.randn(301, 200) * torch.linspace(0.2, 3, 200)
    codes, scale = int8_channel_codes(w)
    bias = torch.randn(301)
    for rows, k in ((1, 200), (2, 77), (16, 64), (1, 13)):  # past and below the 64- and 16-byte steps
        x = torch.randn(rows, k) * 3
        for b in (bias, None):
            assert torch.equal(int8_dynamic_linear(x, codes[:, :k], scale, b),
                               int8_dynamic_linear_reference(x, codes[:, :k], scale, b)), (rows, k)


def test_the_int8_head_gives_its_references_bits(variant):
    w = torch.randn(301, 77) * torch.linspace(0.2, 3, 77)
    codes, scale = int8_channel_codes(w)
    bias = torch.randn(301)
    for rows in (1, 2, 16):
        x = torch.randn(rows, 77)
        for b in (bias, None):
            assert torch.equal(int8_weight_linear(x, codes, scale, b), int8_linear_reference(x, codes, scale, b))


HADAMARD_SHAPES = ((1536, 1), (576, 1), (64, 9), (40, 1), (12, 4), (256, 2))


@pytest.fixture(scope="module")
def generic_results():
    """The generic C variant's Hadamards and attention: what every SIMD variant must reproduce."""
    lib = variant_library("generic")
    with pytest.MonkeyPatch.context() as patch, native_ops.suspended():
        patch.setattr(native, "library", lambda: lib)
        return {shape: hadamard_transform_cpu(hadamard_input(*shape), shape[1]) for shape in HADAMARD_SHAPES}


def hadamard_input(m: int, inner: int) -> torch.Tensor:
    return torch.randn(19, m * inner, generator=torch.Generator().manual_seed(m + inner))  # a block of 16 and a partial one


def test_the_hadamard_stages_are_the_same_on_every_variant(variant, generic_results):
    for (m, inner), expected in generic_results.items():
        x = hadamard_input(m, inner)
        y = hadamard_transform_cpu(x, inner)
        assert torch.equal(y, expected), (variant, m, inner)
        # one row alone (a decode step's layout: no lanes, in-vector levels) gives its row's bits
        assert torch.equal(hadamard_transform_cpu(x[:1], inner), expected[:1]), (variant, m, inner)
        torch.testing.assert_close(y, hadamard_transform_reference(x, inner), rtol=1e-5, atol=1e-5)


def test_the_fused_hadamard_quantizer_gives_the_two_ops_bits_on_every_variant(variant, generic_results):
    """native.hadamard_codes (a prefill's online Hadamard and activation quantization in one pass)
    against the generic variant's transform, then the quantizer in torch: codes and scales to the bit."""
    for (m, inner), rotated in generic_results.items():
        x = hadamard_input(m, inner) * torch.linspace(0.2, 9, m * inner)
        for rows in (x, x[:1]):
            for bits in (4, 8):
                codes, scales = quantize_per_token(rows, bits, 0.9, inner)
                expected = activation_codes(hadamard_transform_cpu(rows, inner), bits, 0.9)
                assert torch.equal(codes, expected[0].to(torch.int8)) and torch.equal(scales, expected[1]), \
                    (variant, m, inner, bits, rows.shape[0])


def attention_inputs(groups=2, tokens=70, d=64, kv_heads=2, batch=1):
    g = torch.Generator().manual_seed(3 + groups + tokens + d)
    q = torch.randn(batch, kv_heads * groups, 1, d, generator=g)
    keys = kv_quantize(torch.randn(batch, kv_heads, tokens, d, generator=g) * 3, 4, 0.95)
    values = kv_quantize(torch.randn(batch, kv_heads, tokens, d, generator=g), 4, 0.95)
    return q, keys, values


# decode shapes: query heads per kv head 1-5 (the AVX512 builds' register path takes up to 4), a
# partial group of 8 keys, several 64-token blocks and 128-token spans, d 64, 32 and 40 (not a
# multiple of 16: the 8-lane path), a static cache's masked tail, a causal single row
ATTENTION_CASES = [dict(groups=2), dict(groups=1, tokens=300), dict(groups=3, tokens=529, mask=500),
                   dict(groups=4, tokens=200, batch=2), dict(groups=5, tokens=100), dict(groups=3, tokens=77, d=32),
                   dict(groups=3, tokens=90, d=40), dict(groups=3, tokens=130, causal=True)]


def test_packed_attention_is_the_same_on_every_simd_variant(variant):
    """The SIMD variants share one summation order (AVX2's 8 lanes); the generic one sums its dot
    products in order, so it agrees to float rounding."""
    avx2 = variant_library("avx2")
    for case in ATTENTION_CASES:
        case = dict(case)
        seen, causal = case.pop("mask", None), case.pop("causal", False)
        q, keys, values = attention_inputs(**case)
        d, tokens = q.shape[-1], keys[0].shape[2]
        mask = None if seen is None else (torch.arange(tokens) < seen).reshape(1, 1, 1, tokens)
        args = (q, *keys, *values, 4, d, torch.float32, mask, None, causal, case["groups"] > 1)
        out = packed_attention(*args)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(native, "library", lambda: avx2)
            expected = packed_attention(*args)
        if variant == "generic":
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(out, expected), (variant, case)


def test_int8_query_attention_agrees_on_every_simd_variant_and_is_float_on_the_generic_one(variant):
    """Integer Q·Kᵀ sums are exact, and so are P·V's sums of 8-bit weight codes times centered codes
    (VNNI's vpdpbusd in the AVX512 builds, fp32 FMAs of integers in the avx2 one); the AVX512 builds'
    softmax adds its 16 lanes in another order: the same numbers to float rounding. The generic
    build has no such kernel: the op gives packed_attention's float result."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 80, 64, generator=g)
    keys = kv_quantize(torch.randn(1, 2, 80, 64, generator=g), 4, 0.95)
    values = kv_quantize(torch.randn(1, 2, 80, 64, generator=g), 4, 0.95)
    args = (q, *keys, *values, 4, 64, torch.float32, None, None, True, True)
    out = int8_query_attention(*args)
    if variant == "generic":
        assert torch.equal(out, packed_attention(*args))
        return
    with pytest.MonkeyPatch.context() as patch:
        avx2 = variant_library("avx2")
        patch.setattr(native, "library", lambda: avx2)
        expected = int8_query_attention(*args)
    if variant in ("avx512bf16", "avx512vnni"):
        assert not torch.equal(out, packed_attention(*args))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(out, expected)


def test_the_best_variant_the_cpu_has_is_loaded_and_named():
    supported = [name for name in NAMES if native.cpu_supports(name) and native.load_variant(name) is not None]
    if native.library() is None:
        pytest.skip(f"no C kernels here: {native.unavailable_reason()}")
    assert native.variant() == supported[0]
    assert native.cpu_supports("generic")


def test_a_bad_or_unsupported_isa_request_names_the_allowed_variants(monkeypatch):
    monkeypatch.setenv(native.ISA_ENVIRONMENT, "sse9")
    with pytest.raises(ValueError, match="QUAROT_FX_ISA='sse9' is not a kernel variant.*avx512bf16, avx512vnni, avx2, generic"):
        native._requested()
    monkeypatch.setenv(native.ISA_ENVIRONMENT, "generic")
    assert native._requested() == "generic"
    lacking = [name for name in NAMES if not native.cpu_supports(name)]
    if lacking:
        monkeypatch.setenv(native.ISA_ENVIRONMENT, lacking[0])
        with pytest.raises(ValueError, match="lacks the features"):
            native._requested()
