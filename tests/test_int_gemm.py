"""CPU integer GEMM dispatch: a real int8 GEMM and the float32 emulation give the same bits, and
the choice between them is measured (or forced by option / environment), never assumed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import quarot_fx
from quarot_fx.kernels import int_gemm, native
from quarot_fx.kernels.quantized_linear import pack_linear_weight, quantized_linear
from test_quant_kernels import DTYPES, linear_inputs
from tiny_models import tiny_model, token_ids


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch):
    monkeypatch.delenv(int_gemm.ENVIRONMENT, raising=False)
    int_gemm.forget()
    yield
    int_gemm.forget()


@given(m=st.integers(1, 40), k=st.sampled_from([8, 24, 64, 96]), n=st.integers(1, 24), groups=st.sampled_from([1, 2, 4]),
       bias=st.booleans(), out_dtype=st.sampled_from(DTYPES), seed=st.integers(0, 50))
def test_int8_gemm_and_float_emulation_agree_bit_for_bit(m, k, n, groups, bias, out_dtype, seed):
    if (k // groups) % 2:
        groups = 1
    codes, x_scale, w, w_scale, b = linear_inputs(m, k, n, groups, seed, bias)
    args = (codes, x_scale, pack_linear_weight(w, groups), w_scale, b, k, out_dtype)
    assert torch.equal(quantized_linear(*args, "int8"), quantized_linear(*args, "float"))


def on_threads(threads: int, fn, *args):
    """fn(*args) with torch's thread count set to ``threads`` (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("x_code, w_code", [(-128, 7), (127, -8), (None, None)])
def test_int8_sums_scaled_in_place_give_the_float_emulations_bits(x_code, w_code, threads, monkeypatch):
    """One-group float32 linears on the int8 GEMM write its int32 sums into the output's own bytes
    and scale them there in one C pass (``native.int32_epilogue``): the emulation's bits, with
    the largest sums, a bias, a width that is no multiple of the SIMD tile, on any thread count."""
    if native.library() is None:
        pytest.skip(native.unavailable_reason())
    m, k, n = 300, 1536, 601
    codes, x_scale, w, w_scale, b = linear_inputs(m, k, n, 1, 3)
    if x_code is not None:
        codes, w = torch.full_like(codes, x_code), torch.full_like(w, w_code)
    args = (codes, x_scale * 1e3, pack_linear_weight(w, 1), w_scale, b, k, torch.float32)
    scaled = []
    real = native.int32_epilogue
    monkeypatch.setattr(native, "int32_epilogue", lambda sums, *rest: scaled.append(sums.shape) or real(sums, *rest))
    y = on_threads(threads, quantized_linear, *args, "int8")
    assert scaled == [(m, n)]
    assert torch.equal(y, quantized_linear(*args, "float"))
    if x_code is not None:
        assert torch.equal(y, ((x_code * w_code * k) * w_scale.T) * (x_scale * 1e3) + b)


def test_each_policy_runs_its_own_gemm(monkeypatch):
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or real(a, b))
    codes, x_scale, w, w_scale, b = linear_inputs(6, 32, 5, 2)
    args = (codes, x_scale, pack_linear_weight(w, 2), w_scale, b, 32, torch.float32)
    quantized_linear(*args, "float")
    assert calls == []
    quantized_linear(*args, "int8")
    assert calls == [(6, 16), (6, 16)]  # one int8 GEMM per weight group


def fake_timings(measured, verdict):
    """A ``measure`` stand-in: records the shapes and candidates asked, times ``verdict`` fastest."""
    return lambda *shape, **how: measured.append(shape) or {c: 1.0 if c == verdict[0] else 2.0 for c in shape[-1]}


def test_a_weight_unpacked_on_every_call_is_measured_with_its_unpacking(monkeypatch):
    """Without resident weights a GEMM on unpacked codes unpacks them each call: the decision that
    measured it without that work (and chose it over the GEMV on packed bytes) was not what runs."""
    asked = []
    monkeypatch.setattr(int_gemm, "measure", lambda *shape, **how: asked.append(how) or {c: 1.0 for c in shape[-1]})
    int_gemm.decide(1, 64, 32, 64, unpacks=True)
    int_gemm.decide(1, 64, 32, 64, unpacks=False)
    assert asked == [{"unpacks": True}, {"unpacks": False}]  # two decisions, one per way of calling
    ms = int_gemm.measure(1, 64, 32, 64, ("int8", "float"), repeats=1, unpacks=True)  # the real timing runs
    assert set(ms) == {"int8", "float"} and all(t > 0 for t in ms.values())


def test_auto_keeps_the_measured_winner_once_per_shape(monkeypatch):
    measured, verdict = [], ["int8"]
    monkeypatch.setattr(int_gemm, "measure", fake_timings(measured, verdict))
    first = int_gemm.decide(100, 64, 32, 64)
    assert (first.choice, first.by, first.rows) == ("int8", "measured", 128)
    verdict[0] = "float"
    assert int_gemm.decide(120, 64, 32, 64) is first  # same bucket: no new measurement
    c_kernels = ("int4",) * native.applies(128, 64, 64)  # where the C library built
    assert measured == [(128, 64, 32, 64, ("int8", "float") + c_kernels)]
    assert int_gemm.decide(1, 64, 32, 64).choice == "float"  # decode rows: measured on their own
    assert int_gemm.decide(1, 64, 32, 64, "int8").by == "option"
    assert len(measured) == 2


def test_a_prefill_shape_is_decided_by_its_finalists_timed_at_its_own_rows(monkeypatch):
    """At 128 rows scaled to 2048, a GEMM with per-call fixed work looks slower than it is (and one
    that slows down at many rows faster): the candidates near the best estimate are timed again at
    the bucket's rows, and that timing decides; a candidate far behind is not timed again."""
    asked = []

    def timings(rows, k, n, group, candidates, unpacks=False, probe_rows=int_gemm.PROBE_ROWS):
        asked.append((probe_rows, candidates))
        estimate = {"int8": 1.0, "int4": 1.5, "float": 5.0}
        full = {"int8": 3.0, "int4": 2.0, "float": 4.0}
        return {c: (full if probe_rows > int_gemm.PROBE_ROWS else estimate)[c] for c in candidates}

    monkeypatch.setattr(int_gemm, "gemm_candidates", lambda: ("int8", "float", "int4"))
    monkeypatch.setattr(int_gemm, "gemm_candidate", lambda name: type("C", (), {"applies": lambda *a: True}))
    monkeypatch.setattr(int_gemm, "measure", timings)
    decision = int_gemm.decide(2048, 576, 1536, 576)
    assert asked == [(int_gemm.PROBE_ROWS, ("int8", "float", "int4")), (2048, ("int8", "int4"))]
    assert (decision.choice, decision.int4_ms, decision.int8_ms, decision.float_ms) == ("int4", 2.0, 3.0, 5.0)
    asked.clear()
    assert int_gemm.decide(128, 576, 1536, 576).choice == "int8"  # timed at its own rows already: one round
    assert asked == [(int_gemm.PROBE_ROWS, ("int8", "float", "int4"))]


@given(m=st.integers(1, 16), half=st.integers(1, 400), n=st.integers(1, 40), bias=st.booleans(),
       out_dtype=st.sampled_from(DTYPES), bits=st.sampled_from([4, 8]), seed=st.integers(0, 50))
def test_int4_gemv_and_float_emulation_agree_bit_for_bit(m, half, n, bias, out_dtype, bits, seed):
    # widths below, at and past the AVX2 kernel's 64-input SIMD step (its scalar tail too) and its
    # 4-step int16 groups, and the AVX512 one's 128-input step (its masked tail); channels past both
    # prefetch distances (16 rows ahead of the 4 read, 12 ahead of the one)
    k = 2 * half
    codes, x_scale, w, w_scale, b = linear_inputs(m, k, n, 1, seed, bias)
    if bits == 8:  # activation codes over the whole int8 range
        codes = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    args = (codes, x_scale, pack_linear_weight(w, 1), w_scale, b, k, out_dtype)
    assert torch.equal(quantized_linear(*args, "int4"), quantized_linear(*args, "float"))


@given(m=st.integers(17, 70), quads=st.integers(1, 110), n=st.integers(1, 40), bias=st.booleans(),
       out_dtype=st.sampled_from(DTYPES), bits=st.sampled_from([4, 8]), seed=st.integers(0, 50))
def test_int4_gemm_and_float_emulation_agree_bit_for_bit(m, quads, n, bias, out_dtype, bits, seed):
    k = 4 * quads  # k % 8 == 4 takes the kernel's byte-wise weight unpacking, k % 8 == 0 the word-wise
    codes, x_scale, w, w_scale, b = linear_inputs(m, k, n, 1, seed, bias)  # rows, columns past whole tiles
    if bits == 8:  # int16 partial sums then widen every 8 steps instead of every 136
        codes = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    args = (codes, x_scale, pack_linear_weight(w, 1), w_scale, b, k, out_dtype)
    assert torch.equal(quantized_linear(*args, "int4"), quantized_linear(*args, "float"))


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("x_code, w_code", [(-128, 7), (127, 7), (-8, 7), (-128, -8)])
@pytest.mark.parametrize("m", [1, 37])
def test_int4_gemm_extreme_codes_on_any_thread_count(x_code, w_code, threads, m):
    """The largest |sum| the int16 partial sums can meet, over every k step, split over threads
    (37·1536·600 multiply-adds: work enough for 3 of the GEMM's threads; one row: the GEMV)."""
    k, n = 1536, 600
    codes, w = torch.full((m, k), x_code, dtype=torch.int8), torch.full((n, k), w_code, dtype=torch.int8)
    args = (codes, torch.ones(m, 1), pack_linear_weight(w, 1), torch.ones(n, 1), None, k, torch.float32)
    y = on_threads(threads, quantized_linear, *args, "int4")
    assert torch.equal(y, torch.full((m, n), float(x_code * w_code * k)))


@pytest.mark.usefixtures("python_bodies")
def test_int4_gemv_runs_and_is_a_candidate_only_where_it_applies(monkeypatch):
    from quarot_fx.kernels import native

    assert native.library() is not None, native.unavailable_reason()
    calls = []
    real = native.int4_linear
    monkeypatch.setattr(native, "int4_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    codes, x_scale, w, w_scale, b = linear_inputs(3, 64, 5, 1)
    quantized_linear(codes, x_scale, pack_linear_weight(w, 1), w_scale, b, 64, torch.float32, "int4")
    assert calls == [(3, 64)]

    measured = []
    monkeypatch.setattr(int_gemm, "measure", fake_timings(measured, ["int4"]))
    assert int_gemm.decide(16, 64, 32, 64).choice == "int4"
    assert int_gemm.decide(17, 64, 32, 64).choice == "int4"  # 32 rows: the GEMM
    assert int_gemm.decide(17, 66, 32, 66).choice == "int8"  # past the GEMV, and the GEMM needs k % 4 == 0
    assert int_gemm.decide(1, 64, 32, 32).choice == "int8"  # two weight groups
    assert int_gemm.decide(1, 63, 32, 63).choice == "int8"  # odd width
    assert int_gemm.decide(1, 64, 32, 64, int4=False).choice == "int8"  # compressed sparse storage
    assert [shape[-1] for shape in measured] == [("int8", "float", "int4")] * 2 + [("int8", "float")] * 4
    forced = int_gemm.decide(64, 66, 32, 66, "int4")  # where it does not apply, measured as under auto
    assert (forced.choice, forced.by) == ("int8", "measured")
    calls.clear()
    codes, x_scale, w, w_scale, b = linear_inputs(40, 64, 5, 1)
    quantized_linear(codes, x_scale, pack_linear_weight(w, 1), w_scale, b, 64, torch.float32, "int4")
    assert calls == [(40, 64)]


def test_without_a_compiler_the_int4_gemv_is_never_chosen(monkeypatch, tmp_path):
    from quarot_fx.kernels import native

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("QUAROT_FX_CACHE", str(tmp_path))
    native.library.cache_clear()
    native.load_variant.cache_clear()
    try:
        assert native.library() is None and "no-such-compiler" in native.unavailable_reason()
        monkeypatch.setattr(int_gemm, "measure", fake_timings([], ["int4"]))
        decision = int_gemm.decide(1, 64, 32, 64, "int4")
        assert decision.choice != "int4" and decision.int4_ms is None
    finally:
        native.library.cache_clear()
        native.load_variant.cache_clear()


@pytest.mark.usefixtures("python_bodies")
def test_compiled_decode_with_the_int4_kernels_gives_the_float_emulations_logits(monkeypatch):
    from quarot_fx.kernels import native

    calls = []
    real = native.int4_linear
    monkeypatch.setattr(native, "int4_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    model, x = tiny_model("llama"), token_ids()
    steps = {}
    for policy in ("int4", "float"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="quarot", options={"preset": "w4a4kv4", "int_gemm": policy})
        with torch.no_grad(), quarot_fx.collect_reports() as reports:
            out = compiled(x, use_cache=True)
            logits = [out.logits]
            for _ in range(2):
                out = compiled(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
                logits.append(out.logits)
        steps[policy] = logits
        decode = [d for report in reports for d in report.gemm if d.rows == 1]
        assert decode and all(d.choice == policy for d in decode)
    assert set(calls) == {x.numel(), 1}  # the prefill's rows (≤ 16 here) and each decode step's one
    assert all(torch.equal(a, b) for a, b in zip(steps["int4"], steps["float"]))


def test_environment_overrides_auto_and_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setattr(int_gemm, "measure", lambda *shape, **_: pytest.fail("the environment decides"))
    monkeypatch.setenv(int_gemm.ENVIRONMENT, "int8")
    assert int_gemm.decide(4, 64, 32, 64).choice == "int8"
    assert int_gemm.decide(4, 64, 32, 64, "float").by == "option"  # the option is stronger
    int_gemm.forget()
    monkeypatch.setenv(int_gemm.ENVIRONMENT, "fast")
    with pytest.raises(ValueError, match="QUAROT_FX_INT_GEMM='fast'.*auto, int8, float, int4"):
        int_gemm.decide(4, 64, 32, 64)


def test_groups_too_long_for_int32_stay_on_the_float_path():
    decision = int_gemm.decide(4, 2**21, 8, 2**21, "int8")
    assert (decision.choice, decision.by) == ("float", "range")


def test_option_is_checked_and_compiled_models_report_and_agree_across_policies():
    with pytest.raises(ValueError, match="int_gemm must be one of 'auto', 'int8', 'float', 'int4'; got 'vnni'"):
        quarot_fx.QuaRotConfig.from_options({"preset": "w4a4kv4", "int_gemm": "vnni"})
    model, x = tiny_model("llama"), token_ids()
    logits = {}
    for policy in ("int8", "float", "auto"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="quarot", options={"preset": "w4a4kv4", "int_gemm": policy})
        with quarot_fx.collect_reports() as reports:
            logits[policy] = compiled(x).logits
        gemm = reports[0].gemm
        assert {d.rows for d in gemm} == {1, 16} and {d.in_features for d in gemm} == {64, 128}
        assert all(d.choice == policy and d.by == "option" for d in gemm) if policy != "auto" else \
            all(d.by == "measured" and d.int8_ms > 0 and d.float_ms > 0 for d in gemm)
        assert "integer GEMM on this CPU" in str(reports[0])
    assert torch.equal(logits["int8"], logits["float"]) and torch.equal(logits["auto"], logits["float"])


def test_resident_unpacked_weights_are_kept_once_per_linear_and_change_nothing():
    import importlib

    kernel = importlib.import_module("quarot_fx.kernels.quantized_linear")
    with pytest.raises(ValueError, match="resident_weights must be one of 'packed', 'unpacked'"):
        quarot_fx.QuaRotConfig.from_options({"preset": "w4a4kv4", "resident_weights": "float"})
    model, x = tiny_model("llama"), token_ids()
    logits = {}
    for resident in ("packed", "unpacked"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="quarot", options={"preset": "w4a4kv4", "resident_weights": resident,
                                                                   "int_gemm": "float"})  # the path that unpacks
        before = len(kernel._unpacked)
        logits[resident] = [compiled(x).logits for _ in range(2)]
        kept = len(kernel._unpacked) - before
        assert kept == (0 if resident == "packed" else 8)  # 2 layers × qkv (stacked), o, gate+up (stacked), down
    assert all(torch.equal(a, b) for a, b in zip(logits["packed"], logits["unpacked"]))
