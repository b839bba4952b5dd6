"""The 8-bit output head (``quantize_lm_head="int8"``, the default with quantized weights, and
``"w8a8"``, its activations in int8 too): found structurally on every architecture, the same bits
in both kernel modes, its ops checked against plain torch, and the option's values checked by name."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import ARCHITECTURES, tiny_model, token_ids

import quarot_fx
from quarot_fx.config import QuaRotConfig
from quarot_fx.kernels import native
from quarot_fx.kernels.int8_linear import (head_activation_codes, int8_channel_codes, int8_dynamic_linear,
                                          int8_dynamic_linear_reference, int8_linear_reference, int8_weight_linear)

INT8_HEAD = "quarot_fx.int8_weight_linear.default"
W8A8_HEAD = "quarot_fx.int8_dynamic_linear.default"


def compiled_logits(model, ids, head_op=INT8_HEAD, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="quarot", options={"preset": "w4a4kv4", **options})
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        logits = compiled(ids, use_cache=False).logits
    heads = sum(str(n.target) == head_op for r in reports for n in r.graph_module.graph.nodes)
    return logits, heads, reports


def head_inputs(rows, k, n, bias, dtype, seed, spread=False):
    """int8 head codes and scales [n, k], input rows (``spread``: channels of different sizes), a bias."""
    g = torch.Generator().manual_seed(seed)
    codes, scale = int8_channel_codes(torch.randn(n, k, generator=g))
    x = torch.randn(rows, k, generator=g)
    x = (x * torch.rand(k, generator=g) * 4 if spread else x).to(dtype)
    return codes, scale, x, torch.randn(n, generator=g) if bias else None


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_head_becomes_int8_on_every_architecture_and_costs_little(arch):
    model, ids = tiny_model(arch), token_ids()
    int8, heads, reports = compiled_logits(model, ids, quantize_lm_head="int8")
    assert heads == 1 and any("output head" in note for r in reports for note in r.notes)
    floating, float_heads, _ = compiled_logits(model, ids, quantize_lm_head=False)
    assert float_heads == 0
    # Only the head's weights differ between the two: 8-bit rounding of a [vocab, d] matrix.
    assert 0 < (int8 - floating).abs().max() <= 0.02 * floating.abs().max()
    fake, _, _ = compiled_logits(model, ids, kernels="fake", quantize_lm_head="int8")
    assert torch.equal(fake, int8)


def test_the_option_takes_false_true_auto_int8_or_w8a8_and_names_them():
    def mode(**options):
        return QuaRotConfig.from_options(options).head_mode

    assert mode(preset="w4a4kv4") == mode(preset="w8a8kv8") == "w8a8"  # "auto": activations quantized anyway
    assert mode(preset="w4a16") == "int8"  # a weight-only config keeps the head's activations float
    assert mode(preset="w4a16", quantize_lm_head="w8a8") == "w8a8" and mode(preset="w4a4kv4", quantize_lm_head="int8") == "int8"
    assert mode(preset="fp") is None and not QuaRotConfig.from_options({"preset": "fp"}).int8_head  # nothing quantized
    assert mode(preset="w4a4kv4", quantize_lm_head=True) is None and mode(preset="w4a4kv4", quantize_lm_head=False) is None
    with pytest.raises(ValueError, match="quantize_lm_head must be one of False, True, 'auto', 'int8', 'w8a8'; got 'int4'"):
        QuaRotConfig.from_options({"preset": "w4a4kv4", "quantize_lm_head": "int4"})


@pytest.mark.parametrize("arch", ARCHITECTURES[:2])
def test_a_w8a8_head_rounds_its_activations_and_gives_the_same_bits_in_both_kernel_modes(arch):
    model, ids = tiny_model(arch), token_ids()
    int8, _, _ = compiled_logits(model, ids, quantize_lm_head="int8")
    w8a8, heads, reports = compiled_logits(model, ids, head_op=W8A8_HEAD)  # the default at W4A4KV4
    assert heads == 1 and any("8-bit activations per row" in note and "'auto' → 'w8a8'" in note
                              for r in reports for note in r.notes)
    # the same weights; the head's input rounded to int8 per row moves the logits a little
    assert 0 < (w8a8 - int8).abs().max() <= 0.02 * int8.abs().max()
    fake, _, _ = compiled_logits(model, ids, head_op=W8A8_HEAD, quantize_lm_head="w8a8", kernels="fake")
    assert torch.equal(fake, w8a8)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), k=st.integers(1, 200), n=st.integers(1, 60), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 100))
def test_the_w8a8_op_gives_its_references_bits_and_stays_within_its_rounding(rows, k, n, bias, dtype, seed):
    codes, scale, x, b = head_inputs(rows, k, n, bias, dtype, seed, spread=True)
    y = int8_dynamic_linear(x, codes, scale, b)
    assert y.dtype == dtype and y.shape == (rows, n)
    assert torch.equal(y, int8_dynamic_linear_reference(x, codes, scale, b))  # C kernel or blocked: exact sums
    # each row's codes are off by at most half a step: |error| <= x_scale / 2 · Σ_k |w · s|
    _, x_scale = head_activation_codes(x.float())
    weights = codes.float() * scale
    exact = x.float() @ weights.T + (b if bias else 0)
    bound = x_scale / 2 * weights.abs().sum(1) + 1e-4 * (1 + x.float().abs() @ weights.abs().T)
    if dtype == torch.bfloat16:  # the output rounded to bfloat16 too
        bound = bound + exact.abs() * 2**-7
    assert ((y.float() - exact).abs() <= bound).all()


def test_one_row_gives_the_bits_it_gets_among_many():
    """A decode row (the C kernel) and the same row in a prefill's batch (the exact float matmul)."""
    g = torch.Generator().manual_seed(5)
    codes, scale = int8_channel_codes(torch.randn(300, 576, generator=g))
    x, b = torch.randn(40, 576, generator=g), torch.randn(300, generator=g)
    many = int8_dynamic_linear(x, codes, scale, b)
    for row in (0, 17, 39):
        assert torch.equal(int8_dynamic_linear(x[row:row + 1], codes, scale, b), many[row:row + 1])


def test_extreme_codes_sum_exactly_in_the_c_kernel():
    if native.library() is None:
        pytest.skip(f"no C kernels: {native.unavailable_reason()}")
    k, n = 1536, 70
    for x_code, w_code in ((127, -128), (-127, 127), (-127, -128)):
        codes = torch.full((20, k), x_code, dtype=torch.int8)  # 20 rows: blocks of 16 and 4
        weight = torch.full((n, k), w_code, dtype=torch.int8)
        y = native.int8_codes_linear(codes, torch.ones(20, 1), weight, torch.ones(n, 1), None, 2)
        assert torch.equal(y, torch.full((20, n), float(x_code * w_code * k)))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), k=st.integers(1, 200), n=st.integers(1, 60), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 100))
def test_the_op_matches_its_reference_and_plain_torch(rows, k, n, bias, dtype, seed):
    codes, scale, x, b = head_inputs(rows, k, n, bias, dtype, seed)
    y = int8_weight_linear(x, codes, scale, b)
    assert y.dtype == dtype and y.shape == (rows, n)
    if rows <= 16 and dtype == torch.float32:  # the C kernel: its reference's bits
        assert torch.equal(y, int8_linear_reference(x, codes, scale, b))
    expected = x.float() @ (codes.float() * scale).T + (b if bias else 0)
    torch.testing.assert_close(y.float(), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-4)
