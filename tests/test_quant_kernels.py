"""Integer quantization ops on CPU: exact against plain-torch references and the fake-quant path."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quarot_fx.kernels import (hadamard_transform, kv_dequantize, kv_dequantize_reference, kv_quantize,
                               kv_quantize_reference, pack_linear_weight, quantize_per_token,
                               unpack_linear_weight,
                               quantize_per_token_reference, quantized_linear, quantized_linear_reference)
from quarot_fx.kernels.quantized_linear import simulated_linear
from quarot_fx.numerics.quant import symmetric_scale, activation_codes, fake_quant_asymmetric, fake_quant_symmetric

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def activations(rows, n, seed=0, dtype=torch.float32):
    """Random rows plus the hard cases: an all-zero row and a row with one huge outlier."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    x[0] = 0
    if rows > 1:
        x[1, n // 2] = 1e4
    return x.to(dtype)


def weights(out, n, seed=1):
    return torch.randint(-8, 8, (out, n), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@given(rows=st.integers(1, 6), n=st.integers(1, 70), bits=st.sampled_from([4, 8]),
       clip=st.sampled_from([1.0, 0.9]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 50))
def test_per_token_codes_are_the_fake_quantizer(rows, n, bits, clip, dtype, seed):
    x = activations(rows, n, seed, dtype)
    codes, scale = quantize_per_token(x, bits, clip)
    assert codes.dtype == torch.int8 and scale.shape == (rows, 1)
    assert codes.int().abs().max() <= 2 ** (bits - 1)
    assert torch.equal(codes.float() * scale, fake_quant_symmetric(x.float(), bits, clip))
    assert torch.equal(codes[0], torch.zeros_like(codes[0])) and scale[0].item() == 1.0


@pytest.mark.parametrize("rows", [5, 40])  # a decode step's rows; a prefill's (whole 16-row blocks and a tail)
@pytest.mark.parametrize("n,inner", [(16, 1), (48, 1), (64, 4), (96, 8), (20, 1), (1536, 1), (576, 1)])
def test_fused_hadamard_quantization_equals_the_unfused_graph(n, inner, rows):
    x = activations(rows, n, seed=n)
    codes, scale = quantize_per_token(x, 4, 0.9, inner)
    expected = fake_quant_symmetric(hadamard_transform(x, inner), 4, 0.9)
    assert torch.equal(codes.float() * scale, expected)
    rotated = hadamard_transform(x, inner)
    assert torch.equal(scale, symmetric_scale(rotated, 4, 0.9)), "the scales are the unfused quantizer's"
    ref_codes, ref_scale = quantize_per_token_reference(x, 4, 0.9, inner)  # dense float64 Hadamard
    assert (codes.int() - ref_codes.int()).abs().max() <= 1
    torch.testing.assert_close(scale, ref_scale)


def test_a_non_finite_row_leaves_the_fused_hadamard_to_the_unfused_ops():
    x = activations(40, 96, seed=2)
    x[33, 7] = float("nan")
    x[2, 0] = float("inf")
    codes, scale = quantize_per_token(x, 4, 0.9, 1)
    ref_codes, ref_scale = quantize_per_token(hadamard_transform(x, 1), 4, 0.9)
    assert torch.equal(codes, ref_codes) and torch.equal(scale.isnan(), ref_scale.isnan())
    assert torch.equal(scale[scale.isfinite()], ref_scale[ref_scale.isfinite()])


def test_per_token_takes_non_contiguous_and_batched_inputs():
    x = activations(8, 40).reshape(2, 4, 40).transpose(0, 1)
    codes, scale = quantize_per_token(x, 4, 0.9)
    assert codes.shape == (4, 2, 40) and scale.shape == (4, 2, 1)
    ref_codes, _ = quantize_per_token(x.contiguous(), 4, 0.9)
    assert torch.equal(codes, ref_codes)


def linear_inputs(m, k, n, groups, seed=0, bias=True, x_dtype=torch.float32):
    x = activations(m, k, seed, x_dtype)
    codes, x_scale = quantize_per_token(x, 4, 1.0)
    w = weights(n, k, seed + 1)
    w_scale = torch.rand(n, groups, generator=torch.Generator().manual_seed(seed)) + 0.01
    b = torch.randn(n) if bias else None
    return codes, x_scale, w, w_scale, b


@given(m=st.integers(1, 9), k=st.integers(1, 70), n=st.integers(1, 20), bias=st.booleans(),
       out_dtype=st.sampled_from(DTYPES), seed=st.integers(0, 50))
def test_quantized_linear_matches_int64_reference(m, k, n, bias, out_dtype, seed):
    codes, x_scale, w, w_scale, b = linear_inputs(m, k, n, 1, seed, bias)
    args = (codes, x_scale, pack_linear_weight(w, w_scale.shape[1]), w_scale, b, k, out_dtype)
    y = quantized_linear(*args)
    assert y.dtype == out_dtype and y.shape == (m, n)
    torch.testing.assert_close(y, quantized_linear_reference(*args))
    # Unit scales expose the integer accumulator: it must be exact.
    ones = (codes, torch.ones_like(x_scale), pack_linear_weight(w, w_scale.shape[1]), torch.ones_like(w_scale), None, k, torch.float32)
    assert torch.equal(quantized_linear(*ones), (codes.long() @ w.long().T).float())


@given(m=st.integers(1, 40), k=st.sampled_from([8, 16, 24, 64, 96]), n=st.integers(1, 24),
       groups=st.sampled_from([1, 2, 4]), bias=st.booleans(), dtype=st.sampled_from(DTYPES),
       gemm=st.sampled_from(["auto", "float", "int8", "int4"]), seed=st.integers(0, 50))
def test_simulated_linear_gives_the_integer_kernels_bits(m, k, n, groups, bias, dtype, gemm, seed):
    """kernels="fake": float codes times float codes, then the scales, is what every CPU GEMM computes."""
    x = activations(m, k, seed, dtype)
    codes, scale = activation_codes(x, 4, 0.9)
    int_codes, int_scale = quantize_per_token(x, 4, 0.9)
    assert torch.equal(codes, int_codes.float()) and torch.equal(scale, int_scale)
    w = weights(n, k, seed + 1)
    w_scale = torch.rand(n, groups, generator=torch.Generator().manual_seed(seed)) + 0.01
    b = torch.randn(n).to(dtype) if bias else None
    simulated = simulated_linear(codes, scale, w.float(), w_scale, b, dtype)
    integer = quantized_linear(int_codes, int_scale, pack_linear_weight(w, groups), w_scale, b, k, dtype, gemm)
    assert simulated.dtype == dtype and torch.equal(simulated, integer)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_inductor_compiles_the_simulated_linear_to_the_same_bits(groups):
    """Inductor may reorder a sum: the groups are added one after the other, an order it keeps."""
    codes, x_scale, w, w_scale, b = linear_inputs(7, 32 * groups, 48, groups)
    args = (codes.float(), x_scale, w.float(), w_scale, b, torch.float32)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(simulated_linear, fullgraph=True)(*args), simulated_linear(*args))


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_scales(groups):
    codes, x_scale, w, w_scale, b = linear_inputs(5, 48, 7, groups)
    args = (codes, x_scale, pack_linear_weight(w, w_scale.shape[1]), w_scale, b, 48, torch.float32)
    y = quantized_linear(*args)
    torch.testing.assert_close(y, quantized_linear_reference(*args))
    dequant = (w.float().reshape(7, groups, -1) * w_scale[..., None]).reshape(7, 48)
    torch.testing.assert_close(y, (codes.float() * x_scale) @ dequant.T + b, rtol=1e-5, atol=1e-4)


@given(out=st.integers(1, 5), k=st.integers(1, 40), groups=st.sampled_from([1, 2]), seed=st.integers(0, 50))
def test_linear_weight_layout_round_trips(out, k, groups, seed):
    if groups > 1 and k % 4:
        k = 4 * (k // 4 + 1)  # groups must be even-sized
    w = weights(out, k, seed)
    packed = pack_linear_weight(w, groups)
    assert packed.dtype == torch.uint8 and packed.shape == (out, (k + 1) // 2)
    assert torch.equal(unpack_linear_weight(packed, k, groups), w)


def test_linear_weight_layout_is_half_split_per_group():
    w = torch.tensor([[1, 2, 3, -1, -2, -3, 7, -8]], dtype=torch.int8)
    assert pack_linear_weight(w).tolist() == [[0xE1, 0xD2, 0x73, 0x8F]]  # byte j: inputs j and j + 4
    assert pack_linear_weight(w, 2).tolist() == [[0x31, 0xF2, 0x7E, 0x8D]]  # groups of 4: j and j + 2
    assert pack_linear_weight(w[:, :5]).tolist() == [[0xF1, 0xE2, 0x03]]  # odd: 3 low, 2 high, pad 0


def test_weight_only_path_dequantizes():
    x = activations(3, 33)
    w, w_scale = weights(6, 33), torch.rand(6, 1) + 0.1
    y = quantized_linear(x, None, pack_linear_weight(w, w_scale.shape[1]), w_scale, None, 33, torch.float32)
    torch.testing.assert_close(y, x @ (w.float() * w_scale).T)


def test_quantized_linear_on_batched_non_contiguous_codes():
    codes, x_scale, w, w_scale, b = linear_inputs(12, 32, 5, 1)
    codes3, scale3 = codes.reshape(3, 4, 32).transpose(0, 1), x_scale.reshape(3, 4, 1).transpose(0, 1)
    y = quantized_linear(codes3, scale3, pack_linear_weight(w, w_scale.shape[1]), w_scale, b, 32, torch.float32)
    expected = quantized_linear(codes3.contiguous(), scale3.contiguous(), pack_linear_weight(w, w_scale.shape[1]), w_scale, b, 32, torch.float32)
    assert torch.equal(y, expected)


def test_quantized_linear_refuses_bad_inputs():
    codes, x_scale, w, w_scale, b = linear_inputs(2, 32, 4, 1)
    with pytest.raises(TypeError, match="packed uint8"):
        quantized_linear(codes, x_scale, w, w_scale, b, 32, torch.float32)
    with pytest.raises(ValueError, match="features"):
        quantized_linear(codes[:, :30], x_scale, pack_linear_weight(w, w_scale.shape[1]), w_scale, b, 32, torch.float32)
    with pytest.raises(TypeError, match="x_scale"):
        quantized_linear(codes, None, pack_linear_weight(w, w_scale.shape[1]), w_scale, b, 32, torch.float32)
    with pytest.raises(ValueError, match="groups"):
        quantized_linear(codes, x_scale, pack_linear_weight(w, w_scale.shape[1]), torch.ones(4, 3), b, 32, torch.float32)


@given(rows=st.integers(1, 6), d=st.integers(1, 40), bits=st.sampled_from([2, 4, 6, 8]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 50))
def test_kv_round_trip_is_the_fake_quantizer(rows, d, bits, dtype, seed):
    x = activations(rows, d, seed, dtype)
    codes, scale, zero = kv_quantize(x, bits, 0.95)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == ((d + 1) // 2 if bits <= 4 else d)
    assert all(torch.equal(a, b) for a, b in zip((codes, scale, zero), kv_quantize_reference(x, bits, 0.95)))
    y = kv_dequantize(codes, scale, zero, bits, d, dtype)
    assert y.dtype == dtype and torch.equal(y, fake_quant_asymmetric(x, bits, 0.95))
    assert torch.equal(y, kv_dequantize_reference(codes, scale, zero, bits, d, dtype))
    assert torch.equal(kv_dequantize(codes, scale, zero.to(torch.uint8), bits, d, dtype), y)  # the packed cache's zeros


@pytest.mark.usefixtures("python_bodies")
def test_kv_ops_run_the_c_kernels_where_built_and_leave_non_finite_values_to_the_reference(monkeypatch):
    from quarot_fx.kernels import native

    assert native.library() is not None, native.unavailable_reason()
    calls = []
    for name in ("kv_quantize", "kv_dequantize"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, real=real, name=name: calls.append((name, a[-1])) or real(*a))
    x = activations(4, 33)
    for bits in (4, 8):
        assert torch.equal(kv_dequantize(*kv_quantize(x, bits, 1.0), bits, 33, torch.float32),
                           fake_quant_asymmetric(x, bits, 1.0))
    # packed nibbles at 4 bits, one byte per code at 8
    assert calls == [("kv_quantize", True), ("kv_dequantize", True), ("kv_quantize", False), ("kv_dequantize", False)]
    x[1, 5], x[2, 7] = float("nan"), float("inf")
    found = kv_quantize(x, 4, 0.9)  # the C kernel declines; the reference decides
    assert all(torch.equal(a, b) for a, b in zip(found, kv_quantize_reference(x, 4, 0.9)) if not b.isnan().any())
    assert found[1][1].isnan().all() and torch.equal(found[0][0], kv_quantize_reference(x, 4, 0.9)[0][0])


def test_ops_refuse_bad_arguments():
    x = activations(2, 8)
    with pytest.raises(ValueError, match="bits"):
        quantize_per_token(x, 16, 1.0)
    with pytest.raises(ValueError, match="clip"):
        kv_quantize(x, 4, 1.5)
    with pytest.raises(TypeError, match="floating"):
        quantize_per_token(x.int(), 4, 1.0)


def test_opcheck():
    x = activations(3, 48)
    torch.library.opcheck(quantize_per_token.default, (x, 4, 0.9, 0))
    torch.library.opcheck(quantize_per_token.default, (x, 4, 0.9, 4))
    codes, x_scale, w, w_scale, b = linear_inputs(3, 33, 5, 1)
    torch.library.opcheck(quantized_linear.default, (codes, x_scale, pack_linear_weight(w, w_scale.shape[1]), w_scale, b, 33, torch.float32))
    torch.library.opcheck(quantized_linear.default, (x, None, pack_linear_weight(weights(5, 48)), w_scale, None, 48, torch.bfloat16))
    packed, scale, zero = kv_quantize(x, 4, 0.95)
    torch.library.opcheck(kv_quantize.default, (x, 4, 0.95))
    torch.library.opcheck(kv_dequantize.default, (packed, scale, zero, 4, 48, torch.float16))


def poisoned(rows=4, n=32):
    """Row 0 holds a NaN, row 1 an Inf, the rest finite."""
    x = activations(rows, n)
    x[0, 3], x[1, 7] = float("nan"), float("inf")
    return x


def test_non_finite_values_propagate_like_eager():
    """NaN in → NaN out (Inf → non-finite) in every quantizer; finite rows are unaffected."""
    x = poisoned()
    for fake in (fake_quant_symmetric(x, 4, 0.9), fake_quant_asymmetric(x, 4, 0.95)):
        assert fake[0].isnan().all() and not torch.isfinite(fake[1]).all() and torch.isfinite(fake[2:]).all()
    codes, scale = quantize_per_token(x, 4, 0.9)
    assert scale[0].isnan().all() and scale[1].isinf().all() and torch.isfinite(scale[2:]).all()
    w_codes = torch.randint(-8, 8, (8, 32), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    y = quantized_linear(codes, scale, pack_linear_weight(w_codes), torch.rand(8, 1) + 0.01, None, 32, torch.float32)
    assert y[0].isnan().all() and not torch.isfinite(y[1]).any() and torch.isfinite(y[2:]).all()
    kv = kv_dequantize(*kv_quantize(x, 4, 0.95), 4, 32, torch.float32)
    assert kv[0].isnan().all() and not torch.isfinite(kv[1]).all() and torch.isfinite(kv[2:]).all()


def test_signed_nibbles_decode_every_byte():
    from quarot_fx.kernels.common import signed_nibbles

    byte = torch.arange(256, dtype=torch.uint8)
    low, high = signed_nibbles(byte)
    assert low.tolist() == [((b & 0xF) ^ 8) - 8 for b in range(256)]
    assert high.tolist() == [((b >> 4) ^ 8) - 8 for b in range(256)]


@pytest.mark.parametrize("gemm", ["float", "int8"])
@pytest.mark.parametrize("weight_only", [False, True])
def test_kept_unpacked_weights_give_the_same_bits_and_follow_in_place_changes(gemm, weight_only):
    import importlib

    kernel = importlib.import_module("quarot_fx.kernels.quantized_linear")
    codes, x_scale, w, w_scale, b = linear_inputs(3, 32, 6, 2)
    x, x_scale = (activations(3, 32), None) if weight_only else (codes, x_scale)
    packed = pack_linear_weight(w, 2)
    run = lambda keep: quantized_linear(x, x_scale, packed, w_scale, b, 32, torch.float32, gemm, keep)  # noqa: E731
    assert torch.equal(run(True), run(False))
    assert len(kernel._unpacked[packed]) == 1
    first = next(iter(kernel._unpacked[packed].values()))[1]
    run(True)
    assert next(iter(kernel._unpacked[packed].values()))[1] is first  # reused, not rebuilt
    packed.copy_(pack_linear_weight(-w.clamp(min=-7), 2))  # an in-place change bumps the version
    assert torch.equal(run(True), run(False))
