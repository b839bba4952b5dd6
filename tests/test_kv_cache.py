"""The packed KV cache: codes in memory, and the same logits as the compiled model's float cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model, token_ids
from transformers import DynamicCache, StaticCache

import quarot_fx
from quarot_fx import generation
from quarot_fx.kernels.common import kv_code_bytes
from quarot_fx.kv_cache import PackedDynamicLayer, PackedKVCache, PackedStaticKVCache
from quarot_fx.numerics.quant import fake_quant_asymmetric

W4 = {"preset": "w4a4kv4", "lowering": "fx"}


def compile_quarot(model, **options):
    return torch.compile(model, backend="quarot", options={**W4, **options})


def steps(compiled, ids, cache=None, decode=3, **kwargs):
    """Logits of a prefill and ``decode`` greedy steps, and the cache they leave."""
    logits = []
    with torch.no_grad():
        out = compiled(ids, cache=cache, use_cache=True, **kwargs)
        for _ in range(decode + 1):
            logits.append(out.logits)
            cache = out.past_key_values
            out = compiled(out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True, **kwargs)
    return logits, cache


def float_cache_steps(monkeypatch, compiled, ids, **kwargs):
    """The same compiled model with transformers' float DynamicCache (the packed cache switched off)."""
    with monkeypatch.context() as patch:
        patch.setattr(generation, "with_packed_cache", lambda module, kw: kw)
        logits, cache = steps(compiled, ids, DynamicCache(), **kwargs)
    assert type(cache) is DynamicCache
    return logits


# 1. Eager: what a layer stores and gives back ----------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), head_dim=st.sampled_from([7, 16, 64]), new=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_a_layer_stores_codes_and_returns_their_dequantized_values(bits, head_dim, new, seed):
    g = torch.Generator().manual_seed(seed)
    layer, seen = PackedDynamicLayer(bits), []
    for length in (new, 1, 2):
        k, v = torch.randn(2, 3, length, head_dim, generator=g), torch.randn(2, 3, length, head_dim, generator=g) * 5
        seen.append((k, v))
        keys, values = layer.update(k, v)
    expected_k = torch.cat([fake_quant_asymmetric(k, bits, 1.0) for k, _ in seen], dim=-2)
    expected_v = torch.cat([fake_quant_asymmetric(v, bits, 1.0) for _, v in seen], dim=-2)
    assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)
    tokens = new + 3
    assert layer.get_seq_length() == tokens
    # codes (two per byte at ≤ 4 bits) + a float32 scale + a one-byte zero point per head vector
    assert layer.nbytes() == 2 * 2 * 3 * tokens * (kv_code_bytes(head_dim, bits) + 4 + 1)
    assert {t.dtype for t in vars(layer).values() if isinstance(t, torch.Tensor)} == {torch.uint8, torch.float32}
    layer.crop(-1)
    assert layer.get_seq_length() == tokens - 1
    assert torch.equal(layer.dequantized()[0], expected_k[..., :-1, :])


def test_a_layer_whose_tensors_were_changed_apart_is_refused_by_name():
    layer = PackedDynamicLayer(4)
    keys = torch.randn(1, 2, 3, 8)
    layer.update(keys, keys)
    layer.value_scale = layer.value_scale[:, :, :2]
    with pytest.raises(ValueError, match=r"\[3, 3, 3, 3, 2, 3\] tokens \(key_codes.*value_scale"):
        layer.update(keys, keys)


@pytest.mark.parametrize("bits", [4, 8])
def test_an_empty_store_dequantizes_to_an_empty_tensor(bits):
    """The first step's past (calibration runs it too): zero tokens, any head_dim."""
    layer = PackedDynamicLayer(bits)
    layer.lazy_initialization(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16))
    keys, values = layer.dequantized()
    assert keys.shape == values.shape == (1, 2, 0, 16)


def test_packed_bytes_of_a_64_dim_head_are_below_0_3_of_fp16():
    layer = PackedDynamicLayer(4)
    layer.update(torch.randn(1, 3, 2048, 64), torch.randn(1, 3, 2048, 64))
    assert layer.nbytes() / (2 * 3 * 2048 * 64 * 2) == pytest.approx(37 / 128)


def test_eager_model_runs_with_both_packed_caches():
    model, ids = tiny_model("llama"), token_ids()
    with torch.no_grad():
        ref = model(ids).logits
        for cache in (PackedKVCache(model.config, bits=8), PackedStaticKVCache(model.config, 32, bits=8)):
            out = model(ids, cache=cache, use_cache=True)
            assert int(cache.get_seq_length()) == ids.shape[1]
            torch.testing.assert_close(out.logits, ref, atol=0.02, rtol=0)  # 8-bit K/V


def test_bad_bits_and_other_layer_kinds_are_refused():
    with pytest.raises(ValueError, match="bits"):
        PackedKVCache(bits=1)
    config = tiny_model("mistral").config
    config.sliding_window, config.layer_types = 4, ["sliding_attention"] * config.num_hidden_layers
    with pytest.raises(ValueError, match="full-attention"):
        PackedKVCache(config)


def test_a_model_with_sliding_windows_keeps_the_float_cache_with_a_warning():
    model, ids = tiny_model("mistral"), token_ids()
    model.config.sliding_window, model.config.layer_types = 4, ["sliding_attention"] * model.config.num_hidden_layers
    with pytest.warns(quarot_fx.QuaRotWarning, match="full-attention"), torch.no_grad():
        out = compile_quarot(model)(ids, use_cache=True)
    assert type(out.past_key_values) is DynamicCache


# 2. Compiled: the packed cache is the float cache's numbers, in a quarter of the memory -----------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compiled_model_creates_a_packed_cache_with_the_float_caches_logits(monkeypatch, arch):
    model, ids = tiny_model(arch), token_ids()
    compiled = compile_quarot(model)
    packed, cache = steps(compiled, ids)
    assert type(cache) is PackedKVCache and cache.get_seq_length() == ids.shape[1] + 4
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    kv_heads, layers = model.config.num_key_value_heads, model.config.num_hidden_layers
    assert cache.nbytes() == layers * 2 * kv_heads * (ids.shape[1] + 4) * (kv_code_bytes(head_dim, 4) + 5)
    for got, expected in zip(packed, float_cache_steps(monkeypatch, compiled, ids)):
        # the same codes; attention reads them block by block (packed_attention), its sums in
        # another order than SDPA's over the float cache
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_packed_cache_through_inductor_and_with_a_searched_style_clip(monkeypatch):
    model, ids = tiny_model("llama"), token_ids()
    compiled = compile_quarot(model, lowering="inductor", kv_clip=0.8)
    packed, cache = steps(compiled, ids, decode=2)
    assert type(cache) is PackedKVCache
    for got, expected in zip(packed, float_cache_steps(monkeypatch, compiled, ids, decode=2)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_store_holds_rotated_keys_quantized_at_the_compiled_clip():
    """Keys in the cache are R3-rotated and quantized with kv_clip: not what the eager cache stores."""
    model, ids = tiny_model("llama"), token_ids()
    _, compiled_cache = steps(compile_quarot(model, kv_clip=0.8), ids, decode=0)
    eager_cache = PackedKVCache(model.config)
    with torch.no_grad():
        model(ids, cache=eager_cache, use_cache=True)
    assert not torch.equal(compiled_cache.layers[0].key_codes, eager_cache.layers[0].key_codes)
    report = quarot_fx.explain(model, ids, model_kwargs={"use_cache": True, "cache": PackedKVCache(model.config)},
                               **W4, kv_clip=0.8)
    stored = [q for q in report.reports[-1].quantized if q.what in ("key", "value")]
    assert stored and all(q.storage == "packed cache" and q.clip == 0.8 for q in stored)


def test_empty_dynamic_and_static_caches_are_replaced_and_reused():
    model, ids = tiny_model("llama"), token_ids()
    compiled = compile_quarot(model)
    with torch.no_grad():
        user = DynamicCache()
        first = compiled(ids, cache=user, use_cache=True).past_key_values
        second = compiled(ids[:, -1:], cache=user, use_cache=True).past_key_values
        assert type(first) is PackedKVCache and second is first and first.get_seq_length() == ids.shape[1] + 1
        static = compiled(ids, cache=StaticCache(model.config, max_cache_len=32), use_cache=True).past_key_values
        assert type(static) is PackedStaticKVCache and int(static.get_seq_length()) == ids.shape[1]


def test_static_packed_cache_matches_the_dynamic_one():
    model, ids = tiny_model("llama"), token_ids()
    compiled = compile_quarot(model)
    dynamic, _ = steps(compiled, ids)
    static, cache = steps(compiled, ids, PackedStaticKVCache(model.config, 32))
    assert type(cache) is PackedStaticKVCache
    for got, expected in zip(static, dynamic):  # the static mask spans 32 slots: float rounding apart
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_a_decode_graph_takes_at_most_one_cache_length_per_layer(cache):
    """The six tensors of a layer share their token count, and the compiled graph knows it: a
    decode step reads and passes one size per layer, not six (each costs the step Python work)."""
    model, ids = tiny_model("llama"), token_ids()
    compiled = compile_quarot(model)
    with torch.no_grad():
        out = compiled(ids, cache=PackedStaticKVCache(model.config, 32) if cache == "static" else PackedKVCache(
            model.config), use_cache=True)
        before = set(map(id, quarot_fx.backend.live_graphs()))
        compiled(out.logits[:, -1:].argmax(-1), cache=out.past_key_values, use_cache=True)
    decode = [g for g in quarot_fx.backend.live_graphs() if id(g) not in before]
    assert len(decode) == 1
    sizes = {str(n.meta["example_value"]) for n in decode[0].template.graph.nodes
             if n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.SymInt)}
    assert len(sizes) <= model.config.num_hidden_layers, sizes


def test_generate_uses_the_packed_cache_and_matches_the_float_cache(monkeypatch):
    model, ids = tiny_model("qwen2"), token_ids()
    compiled = compile_quarot(model)
    made = []
    original = generation.with_packed_cache

    def spy(module, kwargs):
        out = original(module, kwargs)
        made.append(type(out.get("cache", out.get("past_key_values"))))
        return out

    args = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(generation, "with_packed_cache", spy)
        packed = compiled.generate(ids, **args)
    assert made and set(made) == {PackedKVCache}
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(generation, "with_packed_cache", lambda module, kw: kw)
        assert torch.equal(compiled.generate(ids, **args), packed)


# 3. Refusals -------------------------------------------------------------------------------------

def test_a_packed_cache_filled_by_the_eager_model_is_refused():
    model, ids = tiny_model("llama"), token_ids()
    cache = PackedKVCache(model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        with pytest.raises(quarot_fx.ForeignCacheError, match="same compiled model"):
            compile_quarot(model)(ids[:, -1:], cache=cache, use_cache=True)


@pytest.mark.parametrize("kv_bits", [8, 16])
def test_a_packed_cache_of_other_bits_is_refused_by_option_name(kv_bits):
    model, ids = tiny_model("llama"), token_ids()
    with torch.no_grad(), pytest.raises(Exception, match=f"kv_bits={kv_bits}"):
        compile_quarot(model, kv_bits=kv_bits)(ids, cache=PackedKVCache(model.config, bits=4), use_cache=True)


def test_kv_cache_float_keeps_transformers_cache_and_bad_values_are_named():
    model, ids = tiny_model("llama"), token_ids()
    logits, cache = steps(compile_quarot(model, kv_cache="float"), ids, decode=1)
    assert type(cache) is DynamicCache
    packed, _ = steps(compile_quarot(model), ids, decode=1)
    for a, b in zip(logits, packed):  # the same codes, read block by block by packed_attention
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kv_cache.*'packed'"):
        quarot_fx.QuaRotConfig(kv_cache="int4")


def test_models_of_other_kv_bits_in_one_process_keep_their_bits_constant():
    """Dynamo makes an int that changes between calls of one code object symbolic: packed caches
    of 4, then 8, then 4 bits through the same forward must still compile with constant bits."""
    model, ids = tiny_model("llama"), token_ids()
    for bits in (4, 8, 4):
        compiled = compile_quarot(model, preset=f"w{bits}a{bits}kv{bits}")
        logits, cache = steps(compiled, ids, decode=1)
        assert type(cache) is PackedKVCache and cache.bits == bits and torch.isfinite(logits[-1]).all()
