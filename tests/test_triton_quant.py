"""Triton quantization kernels under TRITON_INTERPRET=1 against the CPU ops.

Integer parts (codes, accumulators) must agree exactly; scaled outputs to float tolerance.
"""

import pytest
import torch

from quarot_fx.kernels import (hadamard_transform_reference, kv_dequantize, kv_quantize, pack_linear_weight,
                               quantize_per_token, quantized_linear)

from test_quant_kernels import DTYPES, activations, linear_inputs

triton_quant = pytest.importorskip("quarot_fx.kernels.triton_quant")
triton_linear = pytest.importorskip("quarot_fx.kernels.triton_linear")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 1), (1, 64), (5, 33), (4, 48)])
def test_token_quantization_matches_cpu_exactly(rows, n, dtype):
    x = activations(rows, n, seed=n, dtype=dtype)
    for bits in (4, 8):
        codes, scale = triton_quant.triton_quantize_per_token(x, bits, 0.9)
        ref_codes, ref_scale = quantize_per_token(x, bits, 0.9)
        assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


def test_token_quantization_of_non_contiguous_input():
    x = activations(6, 32).reshape(2, 3, 32).transpose(0, 1)
    codes, scale = triton_quant.triton_quantize_per_token(x, 4, 0.9)
    assert torch.equal(codes, quantize_per_token(x, 4, 0.9)[0])


@pytest.mark.parametrize("n,inner", [(16, 1), (64, 1), (16, 4), (64, 16)])
def test_fused_hadamard_is_exact_where_the_arithmetic_is(n, inner):
    """Integer inputs and m a perfect square (1/√m exact): every sum is exact in float32, so the
    fused kernel's Aᵀ·X·B and the CPU butterfly must give identical codes and scales."""
    x = torch.randint(-20, 21, (6, n), generator=torch.Generator().manual_seed(n)).float()
    x[0] = 0
    codes, scale = triton_quant.triton_quantize_per_token(x, 4, 0.9, inner)
    ref_codes, ref_scale = quantize_per_token(x, 4, 0.9, inner)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)


@pytest.mark.parametrize("n,inner", [(48, 1), (20, 1), (48, 4), (24, 2)])
def test_fused_hadamard_general_sizes(n, inner):
    x = activations(5, n, seed=n)
    codes, scale = triton_quant.triton_quantize_per_token(x, 4, 0.9, inner)
    rotated = hadamard_transform_reference(x.double(), inner)
    exact = rotated / scale.double()
    # Each code is a correct rounding of the exact rotated value (ties may go either way).
    assert ((codes.double() - exact.clamp(-8, 7)).abs() <= 0.5 + 1e-4).all()
    torch.testing.assert_close(scale, quantize_per_token(x, 4, 0.9, inner)[1])


def test_kronecker_split_covers_model_sizes():
    assert triton_quant.kronecker_split(576, 1) == (12, 48)
    assert triton_quant.kronecker_split(4096, 1) == (64, 64)
    assert triton_quant.kronecker_split(32, 128) == (64, 64)  # H_32 ⊗ I_2 | I_64
    assert triton_quant.kronecker_split(11008, 1) is None  # Paley 344 > 128: unfused fallback
    for m, inner in ((576, 1), (48, 4), (96, 1), (20, 3)):
        a, b = triton_quant.kronecker_split(m, inner)
        a_mat, b_mat = triton_quant.split_matrices(m, inner, a, "cpu")
        x = torch.randn(2, m * inner, dtype=torch.float64)
        torch.testing.assert_close(x @ torch.kron(a_mat, b_mat).double(), hadamard_transform_reference(x, inner),
                                   rtol=1e-5, atol=1e-5)


def test_unfused_fallback_for_sizes_without_a_split(monkeypatch):
    monkeypatch.setattr(triton_quant, "MAX_TILE", 8)
    x = activations(3, 48)
    codes, scale = triton_quant.triton_quantize_per_token(x, 4, 0.9, 1)
    ref_codes, ref_scale = quantize_per_token(x, 4, 0.9, 1)
    assert (codes.int() - ref_codes.int()).abs().max() <= 1
    torch.testing.assert_close(scale, ref_scale)


@pytest.mark.parametrize("m,k,n,groups", [(1, 64, 32, 1), (5, 33, 17, 1), (16, 64, 48, 2), (3, 48, 8, 3),
                                          (1, 1, 1, 1)])
def test_w4a4_gemm_integer_accumulator_is_exact(m, k, n, groups):
    codes, x_scale, w, w_scale, b = linear_inputs(m, k, n, groups)
    unit = (codes, torch.ones_like(x_scale), pack_linear_weight(w, w_scale.shape[1]), torch.ones_like(w_scale), None, k, torch.float32)
    assert torch.equal(triton_linear.triton_w4a_linear(*unit), quantized_linear(*unit))


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,groups", [(1, 64, 32, 1), (7, 33, 20, 1), (9, 64, 24, 4)])
def test_w4a4_gemm_scaled_output(m, k, n, groups, out_dtype):
    codes, x_scale, w, w_scale, b = linear_inputs(m, k, n, groups)
    args = (codes, x_scale, pack_linear_weight(w, w_scale.shape[1]), w_scale, b, k, out_dtype)
    torch.testing.assert_close(triton_linear.triton_w4a_linear(*args), quantized_linear(*args))


def test_w4a4_gemm_batched_non_contiguous_codes():
    codes, x_scale, w, w_scale, b = linear_inputs(8, 32, 16, 1)
    codes3, scale3 = codes.reshape(2, 4, 32).transpose(0, 1), x_scale.reshape(2, 4, 1).transpose(0, 1)
    args = (codes3, scale3, pack_linear_weight(w, w_scale.shape[1]), w_scale, b, 32, torch.float32)
    torch.testing.assert_close(triton_linear.triton_w4a_linear(*args), quantized_linear(*args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows,d", [(1, 64), (6, 33), (3, 1)])
def test_kv_kernels_match_cpu_exactly(rows, d, bits, dtype):
    x = activations(rows, d, seed=d, dtype=dtype)
    got = triton_quant.triton_kv_quantize(x, bits, 0.95)
    expected = kv_quantize(x, bits, 0.95)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    y = triton_quant.triton_kv_dequantize(*got, bits, d, dtype)
    # Integer codes are exact above; the interpreter's float32→bf16 cast may differ by an ulp.
    torch.testing.assert_close(y, kv_dequantize(*expected, bits, d, dtype))
    codes, scale, zero = got  # a packed cache keeps the zero point as one byte: same values
    assert torch.equal(triton_quant.triton_kv_dequantize(codes, scale, zero.to(torch.uint8), bits, d, dtype), y)
    assert torch.equal(kv_dequantize(codes, scale, zero.to(torch.uint8), bits, d, dtype),
                       kv_dequantize(codes, scale, zero, bits, d, dtype))


def test_non_finite_values_propagate_as_on_cpu():
    from test_quant_kernels import poisoned

    x = poisoned()
    codes, scale = triton_quant.triton_quantize_per_token(x, 4, 0.9)
    ref_codes, ref_scale = quantize_per_token(x, 4, 0.9)
    assert scale[0].isnan().all() and scale[1].isinf().all()
    assert torch.equal(codes[2:], ref_codes[2:]) and torch.equal(scale[2:], ref_scale[2:])
    kv = triton_quant.triton_kv_dequantize(*triton_quant.triton_kv_quantize(x, 4, 0.95), 4, 32, torch.float32)
    assert kv[0].isnan().all() and not torch.isfinite(kv[1]).all() and torch.isfinite(kv[2:]).all()
