"""The backend lowers quantization to the integer ops: packed weights, same logits as fake quant."""

import copy
from collections import Counter

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model, token_ids

import quarot_fx
from quarot_fx.kernels import native
from quarot_fx.kernels.quantized_linear import simulated_linear
from quarot_fx.numerics.quant import quantize_activation
from quarot_fx.passes.weight_store import WEIGHT_CACHE

W4A4KV4 = {"preset": "w4a4kv4"}


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def compile_and_run(model, ids, options, **call):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="quarot", options={"lowering": "fx", **options}, fullgraph=True)
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        out = compiled(ids, **call)
    return out, reports


def ops(report) -> Counter:
    return Counter(str(n.target) for n in report.graph_module.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_integer_kernels_give_the_fake_quant_logits(arch):
    model, ids = tiny_model(arch), token_ids()
    fake, fake_reports = compile_and_run(model, ids, {**W4A4KV4, "kernels": "fake"}, use_cache=False)
    real, reports = compile_and_run(model, ids, W4A4KV4, use_cache=False)
    assert torch.equal(real.logits, fake.logits)  # the simulated linear sums codes as the kernels do
    found = ops(reports[0])
    linears = [s for s in reports[0].linears if "(embedding" not in s.name]
    quantized = len([s for s in linears if "quantized_linear" in " ".join(s.online)])
    assert quantized == len(linears) - 1  # all but the head
    counters = reports[0].counters  # q/k/v and gate/up read one input: stacked into one call each
    assert found["quarot_fx.quantized_linear.default"] == quantized - counters["stacked_linears"] + counters["stacked_calls"]
    if arch == "llama":
        assert (counters["stacked_linears"], counters["stacked_calls"]) == (5 * 2, 2 * 2)
    assert found["quarot_fx.int8_dynamic_linear.default"] == ops(fake_reports[0])["quarot_fx.int8_dynamic_linear.default"] == 1
    assert found["quarot_fx.kv_quantize.default"] == found["quarot_fx.kv_dequantize.default"] == 2 * 2
    assert "quantize_activation" not in str(found) and "quantize_kv " not in " ".join(found)  # no fake left
    if arch == "llama":  # q/k/v and gate/up share one quantizer: o, down + 2 shared, per layer
        assert found["quarot_fx.quantize_per_token.default"] == 4 * 2
    simulated = ops(fake_reports[0])  # plain torch functions, no integer op
    assert simulated[str(simulated_linear)] == quantized and not any("quarot_fx.quantize" in op for op in simulated)
    assert str(quantize_activation) not in simulated  # every quantized input became codes
    assert {r.storage for r in fake_reports[0].quantized if r.what in ("weight", "activation")} == {"float codes", "int8"}
    assert [r.bits for r in fake_reports[0].quantized if r.storage == "int8"] == [8]  # the head


def test_quantized_linears_hold_only_packed_weights():
    model, ids = tiny_model("llama", hidden=128, heads=4, kv_heads=2, ffn=256), token_ids()
    _, reports = compile_and_run(model, ids, W4A4KV4, use_cache=False)
    gm = reports[0].graph_module
    packed = {n.args[2].target for n in gm.graph.nodes if n.target is torch.ops.quarot_fx.quantized_linear.default}
    assert all(getattr(gm, name).dtype == torch.uint8 for name in packed)
    linear_params = sum(p.numel() for name, p in model.named_parameters() if "proj" in name)
    packed_bytes = sum(getattr(gm, name).numel() for name in packed)
    assert packed_bytes == linear_params // 2
    counters = reports[0].counters
    assert 0.25 <= counters["packed_bytes"] / counters["packed_fp16_bytes"] < 0.3  # int4 + float32 scales
    assert {r.storage for r in reports[0].quantized if r.what == "weight"} == {"packed int4", "int8"}  # int8: the head


def test_online_hadamards_fuse_into_activation_quantization():
    model, ids = tiny_model("llama"), token_ids()
    _, reports = compile_and_run(model, ids, W4A4KV4, use_cache=False)
    calls = [n for n in reports[0].graph_module.graph.nodes if n.target is torch.ops.quarot_fx.quantize_per_token.default]
    fused = [n for n in calls if n.args[3] > 0]
    assert len(fused) == 2 * 2  # o_proj (cross-head) and down_proj (R4) of both layers
    hadamards = ops(reports[0])["quarot_fx.hadamard_transform.default"]
    assert hadamards == 2 * 2  # only R3 (queries, keys) stays a separate op
    assert reports[0].counters["fused_hadamards"] == 2 * 2
    assert {r.storage for r in reports[0].quantized if r.what == "activation"} == {"integer op"}


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("gpt2", torch.float32), ("qwen2", torch.bfloat16)])
def test_inductor_compiles_the_integer_graph(arch, dtype):
    """Through Inductor too the two paths give the same bits (bf16: Inductor rounds where eager does)."""
    model, ids = tiny_model(arch, dtype=dtype), token_ids()
    fake, _ = compile_and_run(model, ids, {**W4A4KV4, "kernels": "fake", "lowering": "inductor"}, use_cache=False)
    real, _ = compile_and_run(model, ids, {**W4A4KV4, "lowering": "inductor"}, use_cache=False)
    assert torch.equal(real.logits, fake.logits)
    eager, _ = compile_and_run(model, ids, W4A4KV4, use_cache=False)
    assert rel_err(real.logits, eager.logits) <= (1e-5 if dtype == torch.float32 else 0.1)


def test_grouped_weights_give_the_integer_bits_through_fx():
    model, ids = tiny_model("mistral"), token_ids()
    options = {**W4A4KV4, "w_group_size": 16}
    fake, _ = compile_and_run(model, ids, {**options, "kernels": "fake"}, use_cache=False)
    real, _ = compile_and_run(model, ids, options, use_cache=False)
    assert torch.equal(real.logits, fake.logits)


@pytest.mark.parametrize("tokens", [1, 40])  # one row: a static shape (Dynamo specializes 1); 40: a prefill
def test_inductor_inlines_activation_quantization_on_cpu_except_after_a_prefills_hadamard(tokens, monkeypatch):
    """On CPU, Inductor decomposes quantize_per_token (its generated loops beat the op's torch
    calls); the packed linears and the Hadamards stay custom ops. Past a decode step's rows a
    quantizer fed by an online Hadamard stays whole (hadamard_quantize), its C kernel rotating and
    quantizing in one pass (native.hadamard_codes); the logits are the same bits either way."""
    fused = []
    real = native.hadamard_codes
    monkeypatch.setattr(native, "hadamard_codes", lambda *a: fused.append(a[0].shape[0]) or real(*a))
    model, ids = tiny_model("llama"), token_ids(length=tokens)
    compiled = torch.compile(model, backend="quarot", options=W4A4KV4)
    with torch.no_grad():
        compiled(ids, use_cache=False)
        with torch.profiler.profile() as prof:
            out = compiled(ids, use_cache=False)
    names = {e.key for e in prof.key_averages()}
    assert {"quarot_fx::quantized_linear", "quarot_fx::hadamard_transform"} <= names
    assert ("quarot_fx::hadamard_quantize" in names) == (tokens > native.FEW_ROWS)
    assert "quarot_fx::quantize_per_token" not in names
    assert bool(fused) == (tokens > native.FEW_ROWS)
    fake, _ = compile_and_run(model, ids, {**W4A4KV4, "kernels": "fake", "lowering": "inductor"}, use_cache=False)
    assert torch.equal(out.logits, fake.logits)


def test_generation_with_quantized_cache_matches_fake_quant():
    model, ids = tiny_model("qwen2"), token_ids()
    tokens = {}
    for kernels in ("fake", "integer"):
        torch._dynamo.reset()
        model.forward = torch.compile(model.__class__.forward.__get__(model), backend="quarot",
                                      options={**W4A4KV4, "lowering": "fx", "kernels": kernels})
        with torch.no_grad():
            tokens[kernels] = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    del model.forward
    assert torch.equal(tokens["integer"], tokens["fake"])


def test_packing_runs_once_across_recompiles():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="quarot", options={**W4A4KV4, "lowering": "fx"})
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        compiled(token_ids(length=8), use_cache=False)
        misses = WEIGHT_CACHE.misses
        for batch in (2, 3):  # batch 1 is a graph of its own (Dynamo specializes size 1)
            compiled(token_ids(length=8, batch=batch), use_cache=False)
    assert len(reports) >= 2  # recompiled for the new batch size
    assert WEIGHT_CACHE.misses == misses


def test_other_weight_widths_stay_simulated_and_say_so():
    model, ids = tiny_model("llama"), token_ids()
    fake, _ = compile_and_run(model, ids, {"preset": "w8a8kv8", "kernels": "fake"}, use_cache=False)
    real, reports = compile_and_run(model, ids, {"preset": "w8a8kv8"}, use_cache=False)
    assert rel_err(real.logits, fake.logits) <= 1e-5
    assert {(r.bits, r.storage) for r in reports[0].quantized if r.what == "weight"} == {(8, "simulated"), (8, "int8")}
    assert any("integer kernels cover 4-bit weights" in note for note in reports[0].notes)  # and says so
    assert ops(reports[0])["quarot_fx.kv_quantize.default"] == 4  # the KV ops still apply


def test_weight_only_w4a16_uses_packed_weights_with_float_inputs():
    model, ids = tiny_model("mistral"), token_ids()
    fake, _ = compile_and_run(model, ids, {"preset": "w4a16", "kernels": "fake"}, use_cache=False)
    real, reports = compile_and_run(model, ids, {"preset": "w4a16"}, use_cache=False)
    assert rel_err(real.logits, fake.logits) <= 1e-5
    calls = [n for n in reports[0].graph_module.graph.nodes if n.target is torch.ops.quarot_fx.quantized_linear.default]
    assert calls and all(n.args[1] is None for n in calls)


def test_bf16_model_runs_integer_kernels():
    """At 4 bits, bf16 rounding flips codes in both paths; the integer path must be as close to the
    float32 computation (same bf16-rounded weights) as the fake path is."""
    model, ids = tiny_model("llama", dtype=torch.bfloat16), token_ids()
    reference, _ = compile_and_run(copy.deepcopy(model).float(), ids, {**W4A4KV4, "kernels": "fake"}, use_cache=False)
    errors = {}
    for kernels in ("fake", "integer"):
        out, _ = compile_and_run(model, ids, {**W4A4KV4, "kernels": kernels}, use_cache=False)
        assert out.logits.dtype == torch.bfloat16
        errors[kernels] = ((out.logits.float() - reference.logits).norm() / reference.logits.norm()).item()
    assert errors["integer"] <= 1.25 * errors["fake"] and errors["integer"] < 0.2


def test_bad_kernels_option_is_refused():
    with pytest.raises(ValueError, match="kernels must be one of 'integer', 'fake'"):
        quarot_fx.QuaRotConfig(kernels="int4")


def test_gptq_weights_are_packed_once_and_not_recalibrated_on_recompile():
    model = tiny_model("llama")
    calibration = [torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    compiled = torch.compile(model, backend="quarot", options={**W4A4KV4, "lowering": "fx", "weights": "gptq",
                                                                "calibration": calibration})
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        for batch in (1, 2, 3):  # batch 1 is a graph of its own (Dynamo specializes size 1)
            compiled(token_ids(length=8, batch=batch), use_cache=False)
    assert len(reports) >= 2
    assert reports[0].counters["gptq_calibration_chunks"] > 0
    assert reports[-1].counters["gptq_calibration_chunks"] == 0  # weights came from the cache
    assert ops(reports[-1])["quarot_fx.quantized_linear.default"] == 4 * 2  # q/k/v and gate/up stacked: 4 calls per layer
