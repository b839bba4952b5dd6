import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import tiny_model, token_ids

import quarot_fx
from quarot_fx.kv_cache import PackedKVCache
from quarot_fx.numerics.quant import (
    fake_quant_asymmetric, fake_quant_symmetric, quantize_kv, quantize_weight_rtn,
)

BITS = list(range(2, 9))


def rows(seed, n=8, d=64, outlier=False):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    if outlier:
        x[:, 3] *= 50
    return x


@given(bits=st.sampled_from(BITS), seed=st.integers(0, 50))
def test_symmetric_round_trip_error_is_at_most_half_a_step(bits, seed):
    x = rows(seed)
    step = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    assert ((fake_quant_symmetric(x, bits) - x).abs() <= step / 2 + 1e-6).all()


@given(bits=st.sampled_from(BITS), seed=st.integers(0, 50))
def test_asymmetric_round_trip_error_is_at_most_half_a_step(bits, seed):
    x = rows(seed) + 0.5
    step = (x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)) / (2**bits - 1)
    assert ((fake_quant_asymmetric(x, bits) - x).abs() <= step / 2 + 1e-6).all()


def test_more_bits_never_hurt():
    x = rows(0, outlier=True)
    errors = [(fake_quant_symmetric(x, b) - x).pow(2).mean().item() for b in BITS]
    assert errors == sorted(errors, reverse=True)
    assert torch.equal(fake_quant_symmetric(x, 16), x)


@given(bits=st.sampled_from(BITS), seed=st.integers(0, 50), outlier=st.booleans(),
       group=st.sampled_from([None, 16, 64]))
def test_clip_search_is_never_worse_than_no_clipping(bits, seed, outlier, group):
    w = rows(seed, outlier=outlier)
    searched = quantize_weight_rtn(w, bits, group, clip_search=True)
    plain = quantize_weight_rtn(w, bits, group, clip_search=False)
    g = group or w.shape[1]
    err = lambda q: (q - w).reshape(w.shape[0], -1, g).pow(2).sum(-1)  # noqa: E731
    assert (err(searched) <= err(plain) + 1e-9).all()


def test_clip_search_helps_on_heavy_tails():
    w = torch.distributions.StudentT(2.0).sample((64, 256))
    searched = (quantize_weight_rtn(w, 4) - w).pow(2).sum()
    plain = (quantize_weight_rtn(w, 4, clip_search=False) - w).pow(2).sum()
    assert searched < 0.9 * plain


@pytest.mark.parametrize("fn", [fake_quant_symmetric, fake_quant_asymmetric])
def test_zero_and_constant_rows_are_exact(fn):
    x = torch.zeros(3, 16)
    x[1] = 0.75
    x[2] = -2.5
    assert torch.equal(fn(x, 4), x)


def test_groups_isolate_an_outlier():
    w = torch.randn(4, 128)
    w[:, 0] = 1000.0
    grouped = quantize_weight_rtn(w, 4, group_size=64, clip_search=False)
    whole = quantize_weight_rtn(w, 4, clip_search=False)
    assert (grouped[:, 64:] - w[:, 64:]).abs().max() < 0.2 * (whole[:, 64:] - w[:, 64:]).abs().max()


def test_group_must_divide():
    with pytest.raises(ValueError, match="group size 48"):
        quantize_weight_rtn(torch.randn(2, 64), 4, group_size=48)


def test_kv_rows_take_at_most_two_to_the_bits_values():
    x = torch.randn(2, 3, 5, 32)
    q = quantize_kv(x, 2, 1.0)
    assert max(len(torch.unique(r)) for r in q.reshape(-1, 32)) <= 4


def compiled(model, **options):
    return torch.compile(model, backend="quarot", options={"lowering": "fx", **options})


def test_kv_cache_is_quantized_in_prefill_and_decode():
    model = tiny_model("llama", hidden=64, heads=2, kv_heads=1)  # head_dim 32
    run = compiled(model, w_bits=16, a_bits=16, kv_bits=2, kv_clip=1.0)
    ids = token_ids()
    with torch.no_grad():
        out = run(ids, use_cache=True)
        step = run(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    assert type(step.past_key_values) is PackedKVCache  # the compiled model made its own packed cache
    for layer in step.past_key_values.layers:
        assert layer.key_codes.dtype == torch.uint8 and layer.bits == 2
        for cached in layer.dequantized():
            assert cached.shape[-2] == ids.shape[1] + 1
            assert max(len(torch.unique(r)) for r in cached.reshape(-1, cached.shape[-1])) <= 4


@pytest.mark.parametrize("kv_bits,max_err", [(8, 0.02), (3, 1.0)])
def test_kv_quantization_reaches_generation(kv_bits, max_err):
    model, ids = tiny_model("qwen2"), token_ids()
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    model.forward = compiled(model.forward, w_bits=16, a_bits=16, kv_bits=kv_bits)
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    err = (torch.stack(out.logits) - torch.stack(ref.logits)).norm() / torch.stack(ref.logits).norm()
    assert len(reports) >= 2 and all(r.counters["kv_tensors_quantized"] == 4 for r in reports)
    assert 1e-5 < err.item() < max_err  # quantization is live (not a no-op) and bounded


@pytest.mark.parametrize("preset,max_err", [("w8a8kv8", 0.05), ("w6a6kv6", 0.15)])
def test_presets_stay_close_to_float(preset, max_err):
    model, ids = tiny_model("llama"), token_ids()
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        out = compiled(model, preset=preset)(ids, use_cache=False).logits
        ref = model(ids, use_cache=False).logits
    assert 1e-5 < ((out - ref).norm() / ref.norm()).item() < max_err
    bits = int(preset[1])
    assert {(r.what, r.method, r.bits) for r in reports[0].quantized if r.storage != "int8"} == {  # int8: the head
        ("weight", "rtn", bits), ("activation", "per-token symmetric", bits),
        ("key", "asymmetric per head", bits), ("value", "asymmetric per head", bits)}
    report = str(reports[0])
    assert "lm_head (linear): offline [fold norm scale, input × hadamard(64)]" in report  # head stays float


def test_gptq_beats_rtn_on_correlated_inputs():
    from quarot_fx.numerics.gptq import gptq_quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated features
    w = torch.randn(32, 64, generator=g)
    h = x.T @ x
    for bits in (3, 4):
        for group in (None, 16):
            for act_order in (False, True):
                gptq = gptq_quantize(w, h, bits, group, act_order=act_order)
                rtn = quantize_weight_rtn(w, bits, group)
                assert (x @ (w - gptq).T).pow(2).sum() < (x @ (w - rtn).T).pow(2).sum()


def test_gptq_handles_dead_inputs_and_keeps_the_grid():
    from quarot_fx.numerics.gptq import gptq_quantize

    x = torch.randn(512, 32)
    x[:, 5] = 0.0  # an input channel that never fires
    w = torch.randn(8, 32)
    q = gptq_quantize(w, x.T @ x, 2)
    assert torch.all(q[:, 5] == 0)
    assert max(len(torch.unique(r)) for r in q) <= 4  # 2-bit grid per row


def test_gptq_through_the_backend_with_calibration():
    model, ids = tiny_model("llama"), token_ids(length=16)
    calibration = [torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    options = dict(w_bits=4, a_bits=16, kv_bits=16)
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        ref = model(ids, use_cache=False).logits
        rtn = compiled(model, **options)(ids, use_cache=False).logits
        torch._dynamo.reset()
        gptq = compiled(model, **options, weights="gptq", calibration=calibration)(ids, use_cache=False).logits
    text = str(reports[-1])
    assert {r.method for r in reports[-1].quantized if r.what == "weight" and r.storage != "int8"} == {"gptq"}
    assert reports[-1].counters["gptq_calibration_chunks"] > 0 and "calibration" in reports[-1].options
    assert "gptq w4" in text
    assert ((gptq - ref).norm() / ref.norm()).item() < 0.2
    assert not torch.allclose(gptq, rtn)
