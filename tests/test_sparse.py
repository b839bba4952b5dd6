"""Sparsity with 4-bit weights: Wanda masks, masked GPTQ, OBR, and the compiled models that use them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quarot_fx.numerics.gptq import gptq_codes
from quarot_fx.numerics.quant import dequantize_weight, weight_codes_rtn
from quarot_fx.numerics.sparse import masked_gptq_codes, obr_codes, parse_pattern, solve_rows, wanda_mask


def layer(out=24, n=32, tokens=256, seed=0):
    """A weight and the Hessian of correlated inputs with a few outlier channels (what rotations face)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n)
    x = torch.randn(tokens, n, generator=g) @ mix
    x[:, :3] *= 8
    return torch.randn(out, n, generator=g), x.T @ x


def objective(w, q, h):
    d = (w - q).double()
    return torch.trace(d @ h.double() @ d.T).item()


@given(out=st.integers(1, 6), groups=st.integers(1, 5), m=st.sampled_from([4, 8]), seed=st.integers(0, 20))
def test_wanda_masks_prune_exactly_the_pattern_and_the_lowest_scores(out, groups, m, seed):
    g = torch.Generator().manual_seed(seed)
    w, norms = torch.randn(out, groups * m, generator=g), torch.rand(groups * m, generator=g) + 0.1
    keep = wanda_mask(w, norms, 0.5)
    assert (keep.sum(1) == groups * m - int(0.5 * groups * m)).all()
    score = w.abs() * norms
    assert (score.masked_fill(~keep, float("inf")).min(1).values >= score.masked_fill(keep, -1).max(1).values).all()
    n = m // 2
    keep = wanda_mask(w, norms, 0.0, f"{n}:{m}").reshape(out, groups, m)
    assert (keep.sum(2) == n).all()


def test_patterns_are_checked():
    assert parse_pattern("unstructured") is None and parse_pattern("2:4") == (2, 4)
    for bad in ("4:4", "0:4", "2/4", "half"):
        with pytest.raises(ValueError, match="sparsity_pattern must be 'unstructured' or 'N:M'"):
            parse_pattern(bad)
    with pytest.raises(ValueError, match="multiple of 4"):
        wanda_mask(torch.ones(2, 6), torch.ones(6), 0, "2:4")


def test_batched_row_solves_equal_one_solve_per_row():
    w, h = layer(8, 20)
    h = h + torch.eye(20)
    g = torch.Generator().manual_seed(3)
    solve_for = torch.rand(8, 20, generator=g) < 0.5
    given_ = ~solve_for & (torch.rand(8, 20, generator=g) < 0.7)
    got = solve_rows(h, solve_for, given_, w)
    for r in range(8):
        a, b = solve_for[r].nonzero()[:, 0], given_[r].nonzero()[:, 0]
        expected = torch.zeros(20)
        expected[a] = torch.linalg.solve(h[a][:, a], h[a][:, b] @ w[r, b])
        torch.testing.assert_close(got[r], expected, rtol=1e-4, atol=1e-4)


def test_masked_gptq_without_a_mask_is_gptq():
    w, h = layer()
    keep = torch.ones_like(w, dtype=torch.bool)
    codes, scales = masked_gptq_codes(w, h, keep, 4)
    expected = gptq_codes(w, h, 4)
    assert torch.equal(codes, expected[0]) and torch.equal(scales, expected[1])


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("2:4", 0.0)])
def test_masked_gptq_compensates_what_it_prunes(pattern, sparsity):
    # SparseGPT-style: the pruned weights enter the sweep with their values, so later columns absorb
    # them; GPTQ of the already-zeroed weight has nothing to compensate and does worse
    w, h = layer(32, 64, seed=2)
    keep = wanda_mask(w, torch.diag(h).sqrt(), sparsity, pattern)
    compensated = objective(w, dequantize_weight(*masked_gptq_codes(w, h, keep, 4)), h)
    codes, scales = gptq_codes(w * keep, h, 4)
    assert compensated < 0.9 * objective(w, dequantize_weight(codes * keep, scales), h)


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("2:4", 0.0)])
def test_obr_beats_wanda_gptq_and_rtn_on_the_layer_objective_with_the_exact_pattern(pattern, sparsity):
    w, h = layer(32, 64, seed=1)
    keep = wanda_mask(w, torch.diag(h).sqrt(), sparsity, pattern)
    results = {}
    for name, solve in (("obr", obr_codes), ("gptq", masked_gptq_codes)):
        codes, scales = solve(w, h, keep, 4)
        assert torch.equal(codes != 0, (codes != 0) & keep)  # nothing pruned comes back
        results[name] = objective(w, dequantize_weight(codes, scales), h)
    rtn = dequantize_weight(*weight_codes_rtn(w * keep, 4, None, True))
    results["rtn"] = objective(w, rtn, h)
    assert results["obr"] < results["gptq"] < results["rtn"], results


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 100), groups=st.sampled_from([None, 16]))
def test_obr_keeps_the_mask_and_the_dense_grid(seed, groups):
    w, h = layer(12, 32, seed=seed)
    keep = wanda_mask(w, torch.diag(h).sqrt(), 0.5)
    codes, scales = obr_codes(w, h, keep, 4, groups)
    assert not codes[~keep].any() and codes.abs().max() <= 8
    _, dense_scales = weight_codes_rtn(w, 4, groups, True)
    torch.testing.assert_close(scales, dense_scales)



def calibration():
    from tiny_models import token_ids

    return [token_ids(length=64, seed=s) for s in range(2)]


@pytest.mark.parametrize("options", [
    {"weights": "obr", "sparsity": 0.5},
    {"weights": "gptq", "sparsity_pattern": "2:4"},
    {"weights": "rtn", "sparsity": 0.5, "kernels": "fake"},
    {"weights": "obr", "sparsity_pattern": "2:4", "gptq_sequential": False},
])
def test_compiled_models_store_exactly_the_requested_pattern(options):
    import quarot_fx
    from tiny_models import tiny_model, token_ids

    model, x = tiny_model("llama"), token_ids()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="quarot", options={"preset": "w4a4kv4", "calibration": calibration(),
                                                                "lowering": "fx", **options})
    with quarot_fx.collect_reports() as reports:
        logits = compiled(x).logits
    counters = reports[0].counters
    assert torch.isfinite(logits).all()
    assert counters["sparse_linears"] == 14 and counters["sparse_pattern_violations"] == 0
    assert 0.5 <= counters["sparse_zeros"] / counters["sparse_weights"] < 0.6  # the mask, plus kept weights that round to 0
    method = options["weights"]
    assert all(r.method.startswith(f"{method} + Wanda") for r in reports[0].quantized
               if r.what == "weight" and r.storage != "int8")  # int8: the output head
    assert "pattern holds in every linear" in str(reports[0])
    if options.get("kernels") != "fake":  # counted from the stored codes, kept compressed
        fmt = "2:4" if options.get("sparsity_pattern") == "2:4" else "bitmap"
        assert {r.storage for r in reports[0].quantized if r.what == "weight"} == {f"sparse int4 ({fmt})", "int8"}
        rows = sum(m.out_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
        weights = counters["packed_fp16_bytes"] // 2
        assert counters["packed_bytes"] == 3 * weights // 8 + 4 * rows  # 3 bits per weight + a float32 scale per row
        # the report names GEMMs the sparse op can run (the C int4 kernels read dense packing only)
        assert reports[0].gemm and all(d.choice != "int4" for d in reports[0].gemm)


def test_sparse_storage_runs_the_same_function_as_dense_packing():
    """The same pruned, quantized weights through the compressed kernel and through the dense one."""
    import quarot_fx
    from quarot_fx.kernels import quantized_linear as _  # noqa: F401  (ops registered)
    from tiny_models import tiny_model, token_ids

    model, x = tiny_model("llama"), token_ids()
    options = {"preset": "w4a4kv4", "calibration": calibration(), "lowering": "fx", "weights": "obr",
               "sparsity_pattern": "2:4"}
    torch._dynamo.reset()
    sparse = torch.compile(model, backend="quarot", options=options)(x).logits
    torch._dynamo.reset()
    simulated = torch.compile(model, backend="quarot", options={**options, "kernels": "fake"})(x).logits
    torch.testing.assert_close(sparse, simulated, rtol=0.05, atol=0.05)  # integer vs fake: float noise only


def test_sparsity_options_are_checked():
    from quarot_fx.config import QuaRotConfig

    cal = calibration()
    errors = {
        "sparsity needs calibration": {"sparsity": 0.5},
        r"sparsity must be a number in \[0, 1\)": {"sparsity": 1.0, "calibration": cal},
        "contradicts sparsity_pattern='2:4'": {"sparsity": 0.25, "sparsity_pattern": "2:4", "calibration": cal},
        "sparsity_pattern must be 'unstructured' or 'N:M'": {"sparsity_pattern": "50%"},
        "weights='obr' needs calibration": {"weights": "obr"},
        "gptq_act_order=True works with dense GPTQ only": {"weights": "gptq", "gptq_act_order": True, "sparsity": 0.5,
                                                          "calibration": cal},
        "set w_bits < 16": {"w_bits": 16, "sparsity": 0.5, "calibration": cal},
        "weights must be one of 'rtn', 'gptq', 'obr'": {"weights": "sparsegpt"},
    }
    for message, options in errors.items():
        with pytest.raises(ValueError, match=message):
            QuaRotConfig.from_options({"preset": "w4a4kv4", **options})
    assert QuaRotConfig.from_options({"preset": "w4a4kv4", "sparsity_pattern": "2:4", "calibration": cal}).pruned_fraction == 0.5


def sparse_codes(out, n, pattern, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (out, n), generator=g, dtype=torch.int8)
    keep = wanda_mask(codes.float(), torch.rand(n, generator=g) + 0.1, 0.5, pattern)
    return codes * keep, keep


@given(out=st.integers(1, 5), eighths=st.integers(1, 6), pattern=st.sampled_from(["2:4", "unstructured", "4:8"]),
       seed=st.integers(0, 30))
def test_compressed_storage_round_trips_and_costs_3_bits_per_weight(out, eighths, pattern, seed):
    from quarot_fx.kernels.sparse_linear import compress, decompress

    n = 8 * eighths
    codes, _ = sparse_codes(out, n, pattern, seed)
    fmt, kept = ("2:4", n // 2) if pattern == "2:4" else ("bitmap", n - int(0.5 * n))
    values, meta = compress(codes, fmt, kept)
    assert torch.equal(decompress(values, meta, n, fmt, kept), codes)
    assert (values.numel() + meta.numel()) * 8 == 3 * out * n  # 3 bits per weight, exactly


def test_compression_refuses_weights_without_the_pattern():
    from quarot_fx.kernels.sparse_linear import compress

    dense = torch.ones(2, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="more than 2 nonzero codes"):
        compress(dense, "2:4", 4)
    with pytest.raises(ValueError, match="more than 4 nonzero codes"):
        compress(dense, "bitmap", 4)


@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
@pytest.mark.parametrize("gemm", ["float", "int8"])
@pytest.mark.parametrize("groups", [1, 2])
def test_sparse_kernel_equals_the_dense_kernel_bit_for_bit(fmt, gemm, groups):
    from quarot_fx.kernels import quantize_per_token, quantized_linear, sparse_quantized_linear
    from quarot_fx.kernels.quantized_linear import pack_linear_weight
    from quarot_fx.kernels.sparse_linear import compress
    from test_quant_kernels import activations

    codes, _ = sparse_codes(12, 32, "2:4" if fmt == "2:4" else "unstructured")
    scales = torch.rand(12, groups) + 0.01
    bias = torch.randn(12)
    values, meta = compress(codes, fmt, 16)
    x = activations(5, 32)
    for xq, xs in (quantize_per_token(x, 4, 1.0), (x, None)):
        dense = quantized_linear(xq, xs, pack_linear_weight(codes, groups), scales, bias, 32, torch.float32, gemm)
        sparse = sparse_quantized_linear(xq, xs, values, meta, scales, bias, 32, torch.float32, fmt, 16, gemm)
        assert torch.equal(sparse, dense)
    with pytest.raises(ValueError, match="needs uint8 values"):
        sparse_quantized_linear(x, None, values[:, :-1], meta, scales, bias, 32, torch.float32, fmt, 16)


def test_triton_decompression_of_2_4_equals_the_cpu_one():  # TRITON_INTERPRET=1: conftest
    from quarot_fx.kernels.sparse_linear import compress_24, decompress_24
    from quarot_fx.kernels.triton_sparse import triton_decompress_24

    for seed, (out, n) in enumerate([(3, 16), (2, 72), (1, 8)]):
        codes, _ = sparse_codes(out, n, "2:4", seed)
        values, meta = compress_24(codes)
        assert torch.equal(triton_decompress_24(values, meta, n, block=8), decompress_24(values, meta, n))
