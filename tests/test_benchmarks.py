"""The benchmark helpers whose numbers go into the README: expansion cost, packed bytes, clip table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import plot_clips  # noqa: E402
import ppl  # noqa: E402


def test_expansion_cost_counts_every_linear_that_touches_the_residual_stream():
    model = tiny_model("llama")  # hidden 64, ffn 128, kv width 32, vocab 128, 2 layers
    options = {"preset": "w4a4kv4", "expand": 64, "a_clip": "gbs", "calibration": [object()]}
    assert ppl.residual_width(model, options) == (64, 128)
    # per layer q,o: 64·64 → 128·128; k,v: 32·64 → 32·128; gate, up, down: 128·64 → 128·128; lm_head too
    before = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64) + 128 * 64
    after = 2 * (2 * 128 * 128 + 2 * 32 * 128 + 3 * 128 * 128) + 128 * 128
    cost = ppl.expansion_cost(model, options)
    assert cost["width"] == 128 and cost["extra_dims"] == 64
    assert cost["linear_macs_ratio"] == pytest.approx(after / before, abs=1e-3)
    assert cost["weight_elements_ratio"] == pytest.approx((after + 128 * 128) / (before + 128 * 64), abs=1e-3)
    assert ppl.expansion_cost(model, {"preset": "w4a4kv4"}) is None
    packed, fp16 = ppl.packed_weight_bytes(model, options)
    assert fp16 == 2 * (after - 128 * 128) and packed == (after - 128 * 128) // 2 + 4 * (2 * (2 * 128 + 2 * 32 + 3 * 128))


def test_clip_table_reads_layers_and_inputs_in_graph_order():
    clips = [["model.layers.0.self_attn.q_proj", "activation", 0.9], ["model.layers.0.self_attn", "key", 0.8],
             ["model.layers.1.self_attn.q_proj", "activation", 0.7], ["lm_head", "activation", 1.0]]
    layers, kinds, table = plot_clips.clip_table(clips)
    assert layers == [-1, 0, 1] and kinds == ["q_proj input", "key", "lm_head input"]
    assert table[1, "q_proj input"] == 0.7 and table[0, "key"] == 0.8 and (1, "key") not in table


@pytest.mark.parametrize("name", sorted(ppl.CONFIGS))
def test_every_row_can_count_its_bytes_before_it_calibrates(name):
    # measure() counts bytes first: a row must never lose a calibrated result to this arithmetic
    options = ppl.CONFIGS[name]
    model = tiny_model("llama")
    packed, fp16 = ppl.packed_weight_bytes(model, options)
    assert 0 < packed <= fp16
    ppl.expansion_cost(model, options)


def test_vllm_dtype_auto_follows_the_cpu_and_every_scheme_compiles_and_exports_validly(monkeypatch):
    import serve_vllm

    from quarot_fx.config import QuaRotConfig
    from quarot_fx.kernels import int_gemm

    monkeypatch.setattr(int_gemm, "cpu_flags", lambda: ["avx2", "avx512_bf16", "avx512_vnni"])
    assert serve_vllm.serving_dtype("auto") == "bfloat16"
    monkeypatch.setattr(int_gemm, "cpu_flags", lambda: ["avx2"])  # AVX2 only: vLLM computes bf16 slowly
    assert serve_vllm.serving_dtype("auto") == "float32" and serve_vllm.serving_dtype("bfloat16") == "bfloat16"
    for name, (options, keywords) in serve_vllm.SCHEMES.items():
        calibration = {"calibration": [torch.zeros(1, 8, dtype=torch.long)]} if options.get("weights") else {}
        config = QuaRotConfig.from_options({**options, **calibration})
        assert set(keywords) <= {"online_transforms"}, name
        # an offline export re-quantizes R4's weights by RTN: a calibrated scheme must not ask for it
        assert not (keywords.get("online_transforms") is False and config.weights != "rtn"), name


def test_int_gemm_benchmark_runs_and_checks_every_candidate_against_the_exact_sums(capsys):
    """benchmarks/int_gemm.py asserts that each candidate GEMM gives the exact integer sums before it
    times them; a few rows keep this quick (it had called functions that had moved)."""
    import int_gemm as benchmark

    benchmark.main(["--rows", "2", "--repeats", "1", "--json"])
    rows = [line for line in capsys.readouterr().out.splitlines() if '"shape"' in line]
    assert [json.loads(line)["shape"] for line in rows] == ["2x576->576", "2x576->192", "2x576->1536", "2x1536->576"]


def test_speed_row_limits_name_the_option_on_bad_values():
    import argparse

    import speed

    parser = argparse.ArgumentParser()
    assert speed.row_limits(["torchao int8 dynamic=300", "quarot w4a4kv4=1200.5"], parser) == {
        "torchao int8 dynamic": 300.0, "quarot w4a4kv4": 1200.5}
    for bad in ("torchao=300", "torchao int8 dynamic=soon", "quarot w4a4kv4=0", "300"):
        with pytest.raises(SystemExit):
            speed.row_limits([bad], parser)


def test_speed_reports_rows_stopped_by_their_limit_even_when_none_was_measured(monkeypatch, capsys):
    """A row over its --row-timeout-for limit is listed as stopped, and a run whose every row
    stopped still prints its table (it used to fail on an empty list of measured rows)."""
    import subprocess

    import speed

    limits_seen = []

    real_run = subprocess.run

    def stopped(command, *args, timeout=None, **kwargs):
        if "--only" not in command:  # not a row (e.g. the C library's build asking the compiler's version)
            return real_run(command, *args, timeout=timeout, **kwargs)
        limits_seen.append(timeout)
        raise subprocess.TimeoutExpired(command, timeout)

    monkeypatch.setattr(speed.subprocess, "run", stopped)
    speed.main(["--rows", "float32 eager", "torchao int8 dynamic", "--row-timeout", "50",
                "--row-timeout-for", "torchao int8 dynamic=7"])
    out = capsys.readouterr().out
    assert limits_seen == [50, 7]
    assert "float32 eager" in out and "not finished after 50 s (stopped)" in out
    assert "not finished after 7 s (stopped)" in out


def test_speed_times_float32_eager_in_turn_with_the_row_for_paired_ratios(monkeypatch):
    """--paired: after one warm-up call each, every round times the row's prefill then float32
    eager's, then the two decodes; the paired ratios are the medians' (float32 / row). A machine
    that slows down from round to round slows both alike, so the ratio holds where the ratio to
    a float32 row measured minutes earlier would not."""
    from types import SimpleNamespace

    import speed

    clock, calls, slowdown = [0.0], [], [1.0]

    def prefill(name, seconds):
        def run():
            calls.append(("prefill", name))
            if name == "row":
                slowdown[0] *= 1.5  # the machine drifts from round to round
            clock[0] += seconds * slowdown[0]
        return run

    def decode(name, seconds):
        def run():
            calls.append(("decode", name))
            return seconds * slowdown[0]
        return run

    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])
    args = SimpleNamespace(repeats=3, decode=32)
    row = speed.time_rounds(prefill("row", 1.0), decode("row", 0.5), args, (prefill("fp32", 2.5), decode("fp32", 2.0)))
    assert calls[:4] == [("prefill", "row"), ("decode", "row"), ("prefill", "fp32"), ("decode", "fp32")]
    assert calls[4:] == [("prefill", "row"), ("prefill", "fp32"), ("decode", "row"), ("decode", "fp32")] * 3
    assert row["prefill_s"] == pytest.approx(1.0 * 1.5 ** 3)  # the middle round's drifted time
    assert row["paired_prefill_speedup"] == pytest.approx(2.5) and row["paired_decode_speedup"] == pytest.approx(4.0)
    assert row["paired_fp32_decode_tok_s"] == pytest.approx(32 / (2.0 * 1.5 ** 3))
    unpaired = speed.time_rounds(prefill("row", 1.0), decode("row", 0.5), args)
    assert set(unpaired) == {"prefill_s", "decode_tok_s"}


def test_decode_interleaved_warms_each_model_then_times_them_in_turn_reversing_every_other_round():
    import decode_interleaved

    calls = []

    def decoder(name, seconds):
        def run():
            calls.append(name)
            return seconds
        return run

    seconds = decode_interleaved.interleave({"a": decoder("a", 1.0), "b": decoder("b", 2.0), "c": decoder("c", 3.0)}, 3)
    assert calls == ["a", "b", "c", "a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert seconds == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [3.0] * 3}
