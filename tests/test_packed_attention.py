"""Attention over the packed KV cache (``packed_attention``): the C kernel that dequantizes one
block of tokens at a time agrees with dequantize-then-SDPA, other calls run exactly that, and the
pass puts the op where a compiled model's attention reads the packed cache."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

import quarot_fx
from quarot_fx.kernels import kv_quantize, native, packed_attention, packed_attention_reference
from quarot_fx.passes.packed_attention import fuse_packed_attention
from quarot_fx.report import Report
from test_kv_cache import compile_quarot, float_cache_steps, steps
from tiny_models import tiny_model, token_ids


def cache_parts(x: torch.Tensor, bits: int, byte_zero: bool):
    codes, scale, zero = kv_quantize(x, bits, 0.95)
    return codes, scale, zero.to(torch.uint8) if byte_zero else zero


def attention_inputs(batch, kv_heads, groups, rows, tokens, dim, bits, seed, byte_zero=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, rows, dim, generator=g)
    keys = torch.randn(batch, kv_heads, tokens, dim, generator=g) * 3  # peaked softmax: the online max matters
    values = torch.randn(batch, kv_heads, tokens, dim, generator=g)
    return q, *cache_parts(keys, bits, byte_zero), *cache_parts(values, bits, byte_zero)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 3), groups=st.integers(1, 3), rows=st.integers(1, 16),
       tokens=st.integers(1, 200), dim=st.sampled_from([8, 10, 64]), bits=st.sampled_from([4, 8]),
       causal=st.booleans(), byte_zero=st.booleans(), seed=st.integers(0, 50))
def test_kernel_agrees_with_dequantize_then_sdpa(batch, kv_heads, groups, rows, tokens, dim, bits, causal, byte_zero,
                                                 seed):
    """Tokens across several 64-token blocks, GQA groups, causal rows, 4-bit packed and 8-bit codes."""
    assert native.library() is not None, native.unavailable_reason()
    inputs = attention_inputs(batch, kv_heads, groups, rows, tokens, dim, bits, seed, byte_zero)
    args = (*inputs, bits, dim, torch.float32, None, None, causal, groups > 1)
    expected = packed_attention_reference(*args)
    torch.testing.assert_close(packed_attention(*args), expected, rtol=1e-5, atol=1e-5)


def test_the_kernel_runs_where_it_applies_and_the_reference_elsewhere(monkeypatch):
    calls = []
    real = native.packed_attention
    monkeypatch.setattr(native, "packed_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    inputs = attention_inputs(1, 2, 3, 1, 70, 16, 4, 0)
    packed_attention(*inputs, 4, 16, torch.float32, None, 0.3, False, True)
    assert calls == [(1, 6, 1, 16)]
    for changed in ({"rows": 17}, {"mask": True}, {"dtype": torch.bfloat16}):
        rows = changed.get("rows", 2)
        q, *parts = attention_inputs(1, 2, 1, rows, 30, 16, 4, 1)
        dtype = changed.get("dtype", torch.float32)
        mask = torch.rand(1, 1, rows, 30, generator=torch.Generator().manual_seed(2)) > 0.3 if "mask" in changed else None
        if mask is not None:
            mask[..., 0] = True
        args = (q.to(dtype), *parts, 4, 16, dtype, mask, None, False, False)
        assert torch.equal(packed_attention(*args), packed_attention_reference(*args)), changed
    assert len(calls) == 1


def test_compiled_model_attention_reads_the_packed_cache(monkeypatch):
    calls = []
    real = native.packed_attention
    monkeypatch.setattr(native, "packed_attention", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    model, ids = tiny_model("llama"), token_ids()
    compiled = compile_quarot(model)
    with quarot_fx.collect_reports() as reports:
        packed, _ = steps(compiled, ids, decode=2)
    layers = model.config.num_hidden_layers
    assert [r.counters["packed_attention"] for r in reports] == [layers] * len(reports)
    assert set(calls) == {ids.shape[1], 1} and len(calls) == 4 * layers  # prefill (≤ 16 rows here) and decode
    for got, expected in zip(packed, float_cache_steps(monkeypatch, compiled, ids, decode=2)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class _Attention(torch.nn.Module):
    def forward(self, q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero):
        dequantize = torch.ops.quarot_fx.kv_dequantize.default  # as Dynamo records it
        keys = dequantize(k_codes, k_scale, k_zero, 4, 16, torch.float32)
        values = dequantize(v_codes, v_scale, v_zero, 4, 16, torch.float32)
        if self.repeated:  # transformers' repeat_kv, as with a mask and grouped heads
            keys = keys[:, :, None].expand(-1, -1, 2, -1, -1).flatten(1, 2)
            values = values[:, :, None].expand(-1, -1, 2, -1, -1).flatten(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, dropout_p=self.dropout)
        return out + keys.sum() if self.keys_elsewhere else out


@pytest.mark.parametrize("dropout, keys_elsewhere, repeated, why", [
    (0.0, False, False, None),
    (0.1, False, False, "attention dropout 0.1"),
    (0.0, True, False, "the dequantized cache has other readers than attention"),
    (0.0, False, True, "the dequantized cache is read by getitem, not directly by SDPA"),
])
def test_the_pass_fuses_only_what_it_can_and_says_why_not(dropout, keys_elsewhere, repeated, why):
    module = _Attention()
    module.dropout, module.keys_elsewhere, module.repeated = dropout, keys_elsewhere, repeated
    gm = fx.symbolic_trace(module)
    ctx = type("Context", (), {"gm": gm, "report": Report(graph="test", options={})})()
    fuse_packed_attention(ctx)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    fused = torch.ops.quarot_fx.packed_attention.default in targets
    assert fused == (why is None) and ctx.report.counters["packed_attention"] == int(fused)
    assert {s.why.split(":")[0] for s in ctx.report.skipped} == ({why} if why else set())
    if fused:
        inputs = attention_inputs(1, 2, 1, 3, 40, 16, 4, 5)
        torch.testing.assert_close(gm(*inputs), module(*inputs), rtol=1e-5, atol=1e-5)
