"""The 8-bit output head (``quantize_lm_head="int8"``, the default with quantized weights): found
structurally on every architecture, the same bits in both kernel modes, its op checked against
plain torch, and the option's values checked by name."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import ARCHITECTURES, tiny_model, token_ids

import quarot_fx
from quarot_fx.config import QuaRotConfig
from quarot_fx.kernels.int8_linear import int8_channel_codes, int8_linear_reference, int8_weight_linear

INT8_HEAD = "quarot_fx.int8_weight_linear.default"


def compiled_logits(model, ids, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="quarot", options={"preset": "w4a4kv4", **options})
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        logits = compiled(ids, use_cache=False).logits
    heads = sum(str(n.target) == INT8_HEAD for r in reports for n in r.graph_module.graph.nodes)
    return logits, heads, reports


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_head_becomes_int8_on_every_architecture_and_costs_little(arch):
    model, ids = tiny_model(arch), token_ids()
    int8, heads, reports = compiled_logits(model, ids)
    assert heads == 1 and any("output head" in note for r in reports for note in r.notes)
    floating, float_heads, _ = compiled_logits(model, ids, quantize_lm_head=False)
    assert float_heads == 0
    # Only the head's weights differ between the two: 8-bit rounding of a [vocab, d] matrix.
    assert 0 < (int8 - floating).abs().max() <= 0.02 * floating.abs().max()
    fake, _, _ = compiled_logits(model, ids, kernels="fake")
    assert torch.equal(fake, int8)


def test_the_option_takes_false_true_or_int8_and_names_them():
    assert QuaRotConfig.from_options({"preset": "w4a4kv4"}).int8_head
    assert not QuaRotConfig.from_options({"preset": "fp"}).int8_head  # nothing quantized: the head stays float
    assert not QuaRotConfig.from_options({"preset": "w4a4kv4", "quantize_lm_head": True}).int8_head
    with pytest.raises(ValueError, match="quantize_lm_head must be one of False, True, 'int8'; got 'int4'"):
        QuaRotConfig.from_options({"preset": "w4a4kv4", "quantize_lm_head": "int4"})


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), k=st.integers(1, 200), n=st.integers(1, 60), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 100))
def test_the_op_matches_its_reference_and_plain_torch(rows, k, n, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    codes, scale = int8_channel_codes(torch.randn(n, k, generator=g))
    x = torch.randn(rows, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g) if bias else None
    y = int8_weight_linear(x, codes, scale, b)
    assert y.dtype == dtype and y.shape == (rows, n)
    if rows <= 16 and dtype == torch.float32:  # the C kernel: its reference's bits
        assert torch.equal(y, int8_linear_reference(x, codes, scale, b))
    expected = x.float() @ (codes.float() * scale).T + (b if bias else 0)
    torch.testing.assert_close(y.float(), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-4)
