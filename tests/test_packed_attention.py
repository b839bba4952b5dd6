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
from quarot_fx.config import QuaRotConfig
from quarot_fx.kernels import kv_quantize, native, packed_attention, packed_attention_reference
from quarot_fx.kernels.packed_attention import takes_kernel
from quarot_fx.kv_cache import PackedStaticKVCache
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


def test_a_nan_query_gives_nan_as_sdpa_does_and_other_heads_are_untouched():
    """The kernel's exponentials (eight lanes at once) pass a NaN score on, as expf and SDPA do."""
    q, *parts = attention_inputs(1, 2, 2, 1, 150, 64, 4, 3)
    q[0, 1, 0, 5] = float("nan")
    args = (q, *parts, 4, 64, torch.float32, None, None, False, True)
    out, expected = packed_attention(*args), packed_attention_reference(*args)
    assert out[0, 1].isnan().all() and expected[0, 1].isnan().all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.usefixtures("python_bodies")
def test_the_kernel_runs_where_it_applies_and_the_reference_elsewhere(monkeypatch):
    calls = []
    real = native.packed_attention
    monkeypatch.setattr(native, "packed_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    inputs = attention_inputs(1, 2, 3, 1, 70, 16, 4, 0)
    packed_attention(*inputs, 4, 16, torch.float32, None, 0.3, False, True)
    assert calls == [(1, 6, 1, 16)]
    for changed in ({"rows": 17}, {"mask": "int"}, {"dtype": torch.bfloat16}):
        rows = changed.get("rows", 2)
        q, *parts = attention_inputs(1, 2, 1, rows, 30, 16, 4, 1)
        dtype = changed.get("dtype", torch.float32)
        mask = torch.ones(1, 1, rows, 30, dtype=torch.int32) if "mask" in changed else None  # a dtype SDPA refuses
        args = (q.to(dtype), *parts, 4, 16, dtype, mask, None, False, False)
        if mask is not None:  # the reference runs, and refuses it as SDPA does
            with pytest.raises(RuntimeError, match="attn_mask dtype"):
                packed_attention(*args)
            continue
        assert torch.equal(packed_attention(*args), packed_attention_reference(*args)), changed
    assert len(calls) == 1


def attention_mask(kind: str, shape: tuple, seed: int):
    """A mask SDPA takes: boolean (True: attend) or additive float (−inf and finite biases), of
    ``shape`` (size-1 dims broadcast); ``tail`` masks the last tokens of every row, as a static
    cache masks its unwritten positions."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) > 0.4
    if kind == "tail":
        keep = torch.arange(shape[-1]) < max(1, shape[-1] // 3)
        keep = keep.expand(shape).clone()
    if kind == "float":
        return torch.randn(shape, generator=g).masked_fill(~keep, float("-inf"))
    return keep


@settings(max_examples=60, deadline=None)
@given(kv_heads=st.integers(1, 3), groups=st.integers(1, 3), rows=st.integers(1, 16), tokens=st.integers(1, 200),
       bits=st.sampled_from([4, 8]), kind=st.sampled_from(["bool", "float", "tail"]),
       broadcast=st.sampled_from(["full", "heads", "rows", "2d"]), seed=st.integers(0, 50))
def test_kernel_with_a_mask_agrees_with_dequantize_then_sdpa(kv_heads, groups, rows, tokens, bits, kind, broadcast,
                                                           seed):
    """Masked keys (rows with none left included: SDPA gives them zeros) across blocks, broadcast
    over heads or rows, and a static cache's masked tail whose blocks the kernel skips."""
    inputs = attention_inputs(2, kv_heads, groups, rows, tokens, 16, bits, seed)
    shape = {"full": (2, kv_heads * groups, rows, tokens), "heads": (2, 1, rows, tokens),
             "rows": (1, kv_heads * groups, 1, tokens), "2d": (rows, tokens)}[broadcast]
    mask = attention_mask(kind, shape, seed)
    args = (*inputs, bits, 16, torch.float32, mask, None, False, groups > 1)
    assert takes_kernel(*inputs, 16, torch.float32, mask, groups > 1)
    torch.testing.assert_close(packed_attention(*args), packed_attention_reference(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("python_bodies")
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
    ctx = type("Context", (), {"gm": gm, "report": Report(graph="test", options={}), "config": QuaRotConfig()})()
    fuse_packed_attention(ctx)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    fused = torch.ops.quarot_fx.packed_attention.default in targets
    assert fused == (why is None) and ctx.report.counters["packed_attention"] == int(fused)
    assert {s.why.split(":")[0] for s in ctx.report.skipped} == ({why} if why else set())
    if fused:
        inputs = attention_inputs(1, 2, 1, 3, 40, 16, 4, 5)
        torch.testing.assert_close(gm(*inputs), module(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.usefixtures("python_bodies")
def test_a_static_packed_cache_is_read_by_the_kernel_in_one_decode_graph(monkeypatch, arch):
    """A static cache's graphs slice it (prefill), mask its unwritten tail and repeat kv heads
    (decode): attention still reads the codes, every decode position runs the same graph, and the
    logits are the dynamic cache's to float rounding."""
    calls = []
    real = native.packed_attention
    monkeypatch.setattr(native, "packed_attention", lambda *a: calls.append((a[0].shape[2], a[-1] is not None))
                        or real(*a))
    model, ids = tiny_model(arch), token_ids()
    compiled = compile_quarot(model)
    with quarot_fx.collect_reports() as reports:
        static, cache = steps(compiled, ids, PackedStaticKVCache(model.config, 40), decode=4)
    assert type(cache) is PackedStaticKVCache and int(cache.get_seq_length()) == ids.shape[1] + 5  # steps() runs one step past the last logits
    layers = model.config.num_hidden_layers
    assert len(reports) == 2  # prefill, and one graph for every decode position
    assert [r.counters["packed_attention"] for r in reports] == [layers, layers]
    assert not [s for r in reports for s in r.skipped if s.what.startswith("packed attention")]
    assert calls.count((1, True)) == 5 * layers  # decode: the C kernel, masked
    dynamic, _ = steps(compiled, ids, decode=4)
    for got, expected in zip(static, dynamic):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_cpp_wrapper_calls_the_same_kernels_with_the_same_bits(monkeypatch):
    """``wrapper="cpp"``: Inductor builds each graph (a prefill and the static cache's one decode
    graph) with its C++ wrapper, which calls the ops and gives the Python wrapper's logits bit for bit."""
    from torch._inductor import compile_fx as inductor

    asked = []
    real = inductor.compile_fx

    def compile_fx(*args, **kwargs):  # Inductor calls itself again inside, without our patches
        if "cpp_wrapper" in kwargs.get("config_patches", {}):
            asked.append(kwargs["config_patches"]["cpp_wrapper"])
        return real(*args, **kwargs)

    monkeypatch.setattr(inductor, "compile_fx", compile_fx)
    model, ids = tiny_model("llama"), token_ids()
    logits = {}
    for wrapper in ("python", "cpp"):
        compiled = compile_quarot(model, lowering="inductor", wrapper=wrapper)
        with quarot_fx.collect_reports() as reports:
            logits[wrapper], _ = steps(compiled, ids, PackedStaticKVCache(model.config, 40), decode=3)
        assert len(reports) == 2 and all(r.options["wrapper"] == wrapper for r in reports)
        torch._dynamo.reset()
    assert asked == [False, False, True, True]
    for got, expected in zip(logits["cpp"], logits["python"]):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("mask", [False, True])
def test_decode_spans_give_the_same_bits_on_any_thread_count_and_path(mask):
    """A decode step's tokens are cut into spans of a fixed size (several per kv head here), merged
    in order: 1, 2 and 3 threads, the C++ kernel and the Python body's C call give the same bits."""
    from quarot_fx.kernels import native_ops

    assert native.library() is not None, native.unavailable_reason()
    tokens = 700
    inputs = attention_inputs(2, 3, 3, 1, tokens, 64, 4, 11)
    attn_mask = (torch.arange(tokens) < 650).reshape(1, 1, 1, tokens) if mask else None
    args = (*inputs, 4, 64, torch.float32, attn_mask, None, False, True)
    threads, outs = torch.get_num_threads(), []
    native_ops.load()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(packed_attention(*args))
            with native_ops.suspended():
                outs.append(packed_attention(*args))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], out) for out in outs[1:])
    torch.testing.assert_close(outs[0], packed_attention_reference(*args), rtol=1e-5, atol=1e-5)
