"""``prefill_attention="int8"``: a prefill's Q·Kᵀ with int8 queries and the 4-bit key codes in
integers (``int8_query_attention``). The C kernel computes its reference (queries rounded to int8
per row, then dequantize-then-SDPA) to float rounding plus what its P·V's 8-bit weight codes can
move it (``assert_within_weight_codes``), for any thread count the same bits; every call it does not
cover is ``packed_attention``'s; the pass puts the op where the option asks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quarot_fx
from quarot_fx.numerics.quant import fake_quant_symmetric
from quarot_fx.kernels import int8_query_attention, int8_query_attention_reference, native, packed_attention
from quarot_fx.kernels.packed_attention import takes_int8_kernel
from test_kv_cache import compile_quarot, steps
from test_packed_attention import attention_inputs
from tiny_models import tiny_model, token_ids


def has_kernel() -> bool:
    return native.library() is not None and bool(native.library().gemm_available())


needs_kernel = pytest.mark.skipif(not has_kernel(), reason="the int8 attention kernel needs AVX2")


QA_KEYS = 128  # native.c: the int8 kernel's blocks of keys, from the first token


def assert_within_weight_codes(out, args):
    """out is the reference's to float rounding plus what P·V's 8-bit weight codes can move it. In
    each block of QA_KEYS keys a weight w = p·s (softmax weight times the value's scale) is counted
    in steps of the block's largest value scale times its largest p, over 255, so it moves by at most
    half a step, and multiplies a centered code n = c - 8: an output moves at most the sum over
    blocks of step/2 · sum_j |n_j|. NaN where the reference has NaN."""
    q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, length, dtype, _, scale, causal, gqa = args
    expected = int8_query_attention_reference(*args)
    dequantize = torch.ops.quarot_fx.kv_dequantize
    keys = dequantize(k_codes, k_scale, k_zero, bits, length, dtype).double()
    centered = dequantize(v_codes, torch.ones_like(v_scale), torch.full_like(v_scale, 8.0), bits, length, dtype).double()
    groups = q.shape[1] // k_codes.shape[1]
    keys, centered, value_scale = (t.repeat_interleave(groups, dim=1) for t in (keys, centered, v_scale.double()))
    scores = fake_quant_symmetric(q, 8).double() @ keys.transpose(-1, -2) * (scale or length ** -0.5)
    if causal:  # SDPA's is_causal: row r sees keys 0..r
        rows, tokens = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(rows, tokens, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    moved = torch.zeros_like(expected, dtype=torch.float64)
    for t0 in range(0, keys.shape[2], QA_KEYS):
        block = slice(t0, t0 + QA_KEYS)
        step = value_scale[:, :, block, 0].abs().amax(-1)[..., None] * p[..., block].amax(-1) / 255
        moved += step[..., None] / 2 * centered[:, :, block].abs().sum(-2)[:, :, None, :]
    error, allowed = (out - expected).abs(), moved.float() + 1e-5 + 1e-5 * expected.abs()
    assert ((error <= allowed) | (out.isnan() & expected.isnan())).all(), (error - allowed).nan_to_num().max()


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 3), groups=st.integers(1, 3), rows=st.integers(17, 150),
       extra=st.integers(0, 80), dim=st.sampled_from([8, 24, 64]), bits=st.sampled_from([2, 3, 4]),
       causal=st.booleans(), byte_zero=st.booleans(), seed=st.integers(0, 50))
def test_kernel_agrees_with_int8_queries_then_sdpa(batch, kv_heads, groups, rows, extra, dim, bits, causal, byte_zero,
                                                   seed):
    """Several query and key blocks (64 each), partial tiles, GQA groups, causal (top-left, as SDPA's
    is_causal) and unmasked, with more keys than queries too."""
    inputs = attention_inputs(batch, kv_heads, groups, rows, rows + extra, dim, bits, seed, byte_zero)
    args = (*inputs, bits, dim, torch.float32, None, None, causal, groups > 1)
    assert takes_int8_kernel(*inputs, bits, dim, torch.float32, None, causal, groups > 1)
    assert_within_weight_codes(int8_query_attention(*args), args)


@needs_kernel
def test_the_same_bits_on_any_number_of_threads():
    inputs = attention_inputs(2, 3, 3, 200, 200, 64, 4, 7)
    args = (*inputs, 4, 64, torch.float32, None, None, True, True)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(int8_query_attention(*args))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], out) for out in outs[1:])


@needs_kernel
def test_a_nan_or_infinite_query_gives_nan_rows_and_leaves_the_others():
    q, *parts = attention_inputs(1, 2, 2, 40, 40, 16, 4, 3)
    q[0, 1, 30, 5], q[0, 2, 20, 0] = float("nan"), float("inf")
    args = (q, *parts, 4, 16, torch.float32, None, None, True, True)
    out = int8_query_attention(*args)
    assert out[0, 1, 30].isnan().all() and out[0, 2, 20].isnan().all()
    bad = torch.zeros(out.shape[:3], dtype=torch.bool)
    bad[0, 1, 30] = bad[0, 2, 20] = True
    assert out[~bad].isfinite().all()
    assert_within_weight_codes(out, args)


def test_calls_the_kernel_does_not_cover_are_packed_attentions(monkeypatch):
    """A decode step (≤ 16 rows), a mask, bfloat16, 8-bit codes: the float op's exact result."""
    monkeypatch.setattr(native, "int8_query_attention", lambda *a: pytest.fail("the int8 kernel ran"))
    cases = [dict(rows=16), dict(rows=40, mask=True), dict(rows=40, dtype=torch.bfloat16), dict(rows=40, bits=8)]
    for case in cases:
        rows, bits, dtype = case["rows"], case.get("bits", 4), case.get("dtype", torch.float32)
        q, *parts = attention_inputs(1, 2, 2, rows, 50, 16, bits, 0)
        mask = torch.rand(1, 1, rows, 50, generator=torch.Generator().manual_seed(0)) > 0.3 if "mask" in case else None
        args = (q.to(dtype), *parts, bits, 16, dtype, mask, None, mask is None, True)
        assert torch.equal(int8_query_attention(*args), packed_attention(*args)), case


@needs_kernel
def test_a_compiled_prefill_takes_the_int8_kernel_and_decode_stays_float(monkeypatch):
    calls = []
    real = native.int8_query_attention
    monkeypatch.setattr(native, "int8_query_attention", lambda q, *a: calls.append(q.shape[2]) or real(q, *a))
    model, ids = tiny_model("llama"), token_ids(length=40)
    with quarot_fx.collect_reports() as reports:
        fast = steps(compile_quarot(model, prefill_attention="int8"), ids, decode=2)[0]
    layers = model.config.num_hidden_layers
    assert calls == [40] * layers  # the prefill only
    # the decode graph (one query row) keeps packed_attention, whose calls stay in C++
    assert [r.counters["int8_query_attention"] for r in reports] == [layers, 0]
    assert any("prefill_attention='int8'" in note for r in reports for note in r.notes)
    torch._dynamo.reset()
    exact = steps(compile_quarot(model), ids, decode=2)[0]
    assert not torch.equal(fast[0], exact[0])  # the prefill's queries were rounded
    for got, expected in zip(fast, exact):  # and its logits stay close to the float attention's
        torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
