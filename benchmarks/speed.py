"""Speed and memory of quarot-fx's quantized models against float and a peer, on this CPU.

    python benchmarks/speed.py [--model smollm2-135m] [--prefill 2048] [--prompt 512]
                               [--decode 64] [--repeats 5] [--cache static|dynamic] [--rows ...]
                               [--row-timeout 1800] [--row-timeout-for ROW=SECONDS ...] [--no-paired] [--json]

One run, each model measured in its own subprocess on the same inputs (so peak RSS is that
model's own), median of ≥ 5 after warm-up (BENCHMARK.md), default thread count. Rows:
float32 eager, float32 ``torch.compile`` (inductor), bfloat16 eager, torchao's
``Int8DynamicActivationInt8WeightConfig`` + ``torch.compile`` (the CPU int8 peer users pick;
skipped with a message if torchao is missing: ``pip install -e '.[peers]'``), quarot W8A8KV8 and
W4A4KV4 (integer kernels; with its 8-bit head and int8 activations, the default, with a float
head, and with float activations into the 8-bit head, ``quantize_lm_head="int8"``; with Inductor's
C++ wrapper, ``wrapper="cpp"``; with ``prefill_attention="int8"``), W4A4KV4 with
``resident_weights="unpacked"`` (with the packed KV cache, and with ``kv_cache="float"``), and
llama.cpp (llama-cpp-python, ``n_threads`` = torch's threads) on the Q4_1 GGUF the model ships as
(skipped with a message if llama-cpp-python is missing: ``make llama-cpp``, a ~12-minute build).
A row slower than ``--row-timeout`` is stopped and reported. Figures:

* prefill: latency of one 1×``prefill`` forward with a fresh cache (logits of the last
  position only, as generation's first step computes them);
* decode: tokens/s over ``decode`` greedy steps after a ``prompt``-token prefill, with a static
  cache of ``prompt + decode`` slots (``--cache static``, the default: one decode graph for every
  position; quarot's packed static cache) or the growing default cache (``--cache dynamic``);
* weights: bytes of the weights each model holds; KV cache: bytes its cache holds after
  ``prefill`` tokens (against an fp16 cache of the same shape); peak RSS of its process;
* paired× (``--paired``, the default): each row's process also holds float32 eager and times it in
  turn with the row, round by round; the ratio of the two medians does not move with the
  machine's speed between rows, which on a shared VM drifts by tens of percent within minutes;
* for quarot, a decode step split into time inside kernels (the C kernels timed around each
  call, Inductor's loops and torch's matmuls under the profiler) and the rest (overhead);
* for quarot, the share of prefill time in each quarot_fx op (torch.profiler), the online
  Hadamards (alone or fused into activation quantization) among them, and the integer GEMM
  chosen per shape. The CPU's model and flags, the C kernels' instruction-set variant, and whether
  the ops' calls reach them from C++ (``native_ops``) or through Python, head the output.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from common import cpu_summary

import quarot_fx
from quarot_fx.kernels import int_gemm
from quarot_fx.tools.footprint import (decode_cache, decode_seconds, fp16_cache_bytes, model_weight_bytes,
                                       prefill_cache_bytes, quarot_weight_bytes, unique_bytes)

HADAMARD_EVENTS = ("quarot_fx::hadamard_transform", "quarot_fx::hadamard (fused)")


def prefill_fn(model, ids):
    def run():
        with torch.no_grad():
            return model(ids, use_cache=True, logits_to_keep=1)
    return run


def decode_step_fn(model, prompt, cache_kind: str = "static", steps: int = 8):
    """One decode step after ``prompt`` (each call appends a token to the same cache; up to
    ``steps`` calls)."""
    with torch.no_grad():
        cache = decode_cache(model, prompt.shape[1] + steps, cache_kind)
        out = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    state = {"cache": out.past_key_values, "token": out.logits[:, -1:].argmax(-1)}

    def run():
        with torch.no_grad():
            return model(state["token"], past_key_values=state["cache"], use_cache=True)
    return run


def op_shares(run) -> dict:
    """Share of one call's wall time spent in each quarot_fx op (and in the Hadamards)."""
    run()  # warm (a decode step compiles its graph on first use)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        wall_us = (time.perf_counter() - start) * 1e6
    # not the ops' Python twins (quarot_fx::_<op>_python): they run inside the op's own event
    shares = {e.key: e.cpu_time_total / wall_us for e in prof.key_averages()
              if e.key.startswith("quarot_fx::") and not e.key.startswith("quarot_fx::_")}
    shares["online Hadamards"] = sum(shares.get(k, 0.0) for k in HADAMARD_EVENTS)
    return shares


COMPUTE_EVENTS = ("mkl::", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm",
                  "aten::_weight_int8pack_mm", "aten::linear")


def decode_breakdown(run) -> dict:
    """Milliseconds of one decode step inside kernels (quarot's C kernels, timed around each call;
    Inductor's generated loops, profiled with ``cpp.enable_kernel_profile``; torch's matmuls) and
    the rest: Python, dispatch, guards, allocation, the glue between kernels."""
    from quarot_fx.kernels import native

    run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, native.timed() as c_ns:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    inductor = sum(e.self_cpu_time_total for e in events if "cpp_fused" in e.key) / 1e3
    torch_ops = sum(e.self_cpu_time_total for e in events if e.key.startswith(COMPUTE_EVENTS)) / 1e3
    kernels = c_ns[0] / 1e6 + inductor + torch_ops
    return {"step_ms": 1e3 * wall, "kernel_ms": kernels, "c_kernel_ms": c_ns[0] / 1e6, "inductor_kernel_ms": inductor,
            "torch_matmul_ms": torch_ops, "overhead_ms": 1e3 * wall - kernels}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quarot(options: dict):
    def build(model):
        # Inductor's generated loops report themselves to the profiler (the overhead column needs them).
        torch._inductor.config.cpp.enable_kernel_profile = True
        return torch.compile(model, backend="quarot", options=options)
    return build


def llama_cpp(model_name: str):
    """llama.cpp (llama-cpp-python) on the GGUF the model comes from, as a callable with the
    measuring interface below: the peer users deploy on CPUs."""
    from llama_cpp import Llama

    from quarot_fx.tools.models import smollm2_gguf

    if model_name != "smollm2-135m":
        raise ImportError("the llama.cpp row needs the smollm2-135m GGUF")
    return Llama(model_path=str(smollm2_gguf()), n_threads=torch.get_num_threads(), n_ctx=4096, n_batch=2048,
                 n_ubatch=512, verbose=False)


def llama_cpp_timers(llm, prefill_ids, prompt_ids, args) -> tuple:
    """llama.cpp's (prefill, decode) for ``time_rounds``: prefill of ``prefill`` tokens on an empty
    context; ``decode()`` returns the seconds of ``args.decode`` greedy tokens after ``prompt``."""

    def prefill():
        llm.reset()
        llm.eval(prefill_ids[0].tolist())

    def decode() -> float:
        llm.reset()
        llm.eval(prompt_ids[0].tolist())
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        start = time.perf_counter()
        for _ in range(args.decode):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
        return time.perf_counter() - start

    return prefill, decode


def measure_llama_cpp(llm, prefill_ids, prompt_ids, args, reference=None) -> dict:
    """The same figures from llama.cpp; its KV cache is fp16 (the default), its weights the GGUF."""
    from quarot_fx.tools.models import smollm2_gguf

    start = time.perf_counter()
    row = time_rounds(*llama_cpp_timers(llm, prefill_ids, prompt_ids, args), args, reference)
    row["wall_s"] = time.perf_counter() - start
    row["weight_bytes"] = smollm2_gguf().stat().st_size
    return row


def torch_timers(model, prefill_ids, prompt_ids, args) -> tuple:
    """A torch model's (prefill, decode) for ``time_rounds``."""
    run = prefill_fn(model, prefill_ids)
    return run, lambda: decode_seconds(model, prompt_ids, args.decode, args.cache)


def time_rounds(prefill, decode, args, reference=None) -> dict:
    """prefill_s (median of ``repeats`` calls) and decode_tok_s (``decode`` tokens over the median of
    ``repeats`` timed decodes) after one untimed call of each (compiles, warms caches). With
    ``reference`` (float32 eager's own (prefill, decode), ``--paired``), that model runs in turn with
    this one, round by round, in this process, and the row gets the ratios of the medians
    (paired_prefill_speedup, paired_decode_speedup): a drift of the machine's speed between rows,
    which moves the ratios against the float32 row measured minutes earlier, slows both alike here."""
    timers = {"row": (prefill, decode), **({"fp32": reference} if reference else {})}
    for run, decode_run in timers.values():  # warm-up: compiles, fills caches
        run()
        decode_run()
    prefills = {name: [] for name in timers}
    decodes = {name: [] for name in timers}
    for _ in range(args.repeats):
        for name, (run, _) in timers.items():
            start = time.perf_counter()
            run()
            prefills[name].append(time.perf_counter() - start)
        for name, (_, decode_run) in timers.items():
            decodes[name].append(decode_run())
    medians = {name: (statistics.median(prefills[name]), statistics.median(decodes[name])) for name in timers}
    row = {"prefill_s": medians["row"][0], "decode_tok_s": args.decode / medians["row"][1]}
    if reference:
        row["paired_fp32_prefill_s"], row["paired_fp32_decode_tok_s"] = medians["fp32"][0], args.decode / medians["fp32"][1]
        row["paired_prefill_speedup"] = medians["fp32"][0] / medians["row"][0]
        row["paired_decode_speedup"] = medians["fp32"][1] / medians["row"][1]
    return row


def torchao_int8(model):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return torch.compile(model)


ROWS = {
    "float32 eager": lambda model: model,
    "float32 inductor": torch.compile,
    "bfloat16 eager": lambda model: model.to(torch.bfloat16),
    "torchao int8 dynamic": torchao_int8,
    "quarot w8a8kv8": quarot({"preset": "w8a8kv8"}),
    "quarot w4a4kv4": quarot({"preset": "w4a4kv4"}),
    "quarot w4a4kv4 float-head": quarot({"preset": "w4a4kv4", "quantize_lm_head": False}),
    "quarot w4a4kv4 w8a8-head": quarot({"preset": "w4a4kv4", "quantize_lm_head": "w8a8"}),  # = the default
    "quarot w4a4kv4 int8-head": quarot({"preset": "w4a4kv4", "quantize_lm_head": "int8"}),
    "quarot w4a4kv4 cpp-wrapper": quarot({"preset": "w4a4kv4", "wrapper": "cpp"}),
    "quarot w4a4kv4 int8-attention": quarot({"preset": "w4a4kv4", "prefill_attention": "int8"}),
    "llama.cpp Q4_1 gguf": None,  # measure_one builds it (not a torch module)
    "quarot w4a4kv4 unpacked": quarot({"preset": "w4a4kv4", "resident_weights": "unpacked"}),
    "quarot w4a4kv4 unpacked float-kv": quarot({"preset": "w4a4kv4", "resident_weights": "unpacked",
                                                "kv_cache": "float"}),
}


def measure(name, model, prefill_ids, prompt_ids, args, reference=None) -> dict:
    row = {"model": name}
    with quarot_fx.collect_reports() as reports:
        start = time.perf_counter()
        row.update(time_rounds(*torch_timers(model, prefill_ids, prompt_ids, args), args, reference))
        row["wall_s"] = time.perf_counter() - start
        row["kv_cache_bytes"] = prefill_cache_bytes(model, prefill_ids)
    if reports:
        row.update(quarot_weight_bytes(reports))
        row["op_share"] = op_shares(prefill_fn(model, prefill_ids))
        row["op_share_decode"] = op_shares(decode_step_fn(model, prompt_ids, args.cache))
        row["decode_breakdown"] = decode_breakdown(decode_step_fn(model, prompt_ids, args.cache))
        row["graphs"] = len(reports)
        row["native_ops"] = importlib.import_module("quarot_fx.kernels.native_ops").loaded()
        row["int_gemm"] = [f"{d.rows}x{d.in_features}->{d.out_features}: {d.choice} ({d.by})"
                           for d in int_gemm.decisions()]
        kept = importlib.import_module("quarot_fx.kernels.quantized_linear")._unpacked  # resident_weights="unpacked"
        row["resident_unpacked_bytes"] = unique_bytes(t for forms in kept.values() for _, t in forms.values())
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def measure_one(name: str, args) -> dict:
    """Load the model, build row ``name`` from it and measure it (run in its own process)."""
    from quarot_fx.tools.models import load_model

    model = load_model(args.model)[0]
    g = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(0, model.config.vocab_size, (1, args.prefill), generator=g)
    prompt_ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=g)
    # float32 eager timed in turn with this row (a model of its own: building a row may convert its model)
    reference = (torch_timers(load_model(args.model)[0], prefill_ids, prompt_ids, args)
                 if args.paired and name != "float32 eager" else None)
    if ROWS[name] is None:  # llama.cpp
        row = {"model": name, **measure_llama_cpp(llama_cpp(args.model), prefill_ids, prompt_ids, args, reference),
               "kv_cache_bytes": fp16_cache_bytes(model.config, args.prefill), "peak_rss_mb": peak_rss_mb()}
        row["kv_cache_fp16_bytes"] = row["kv_cache_bytes"]
        return row
    built = ROWS[name](model)
    row = measure(name, built, prefill_ids, prompt_ids, args, reference)
    if "weight_bytes" not in row:  # not quarot: the parameters the (possibly converted) model holds
        row["weight_bytes"] = model_weight_bytes(model)
    row["kv_cache_fp16_bytes"] = fp16_cache_bytes(model.config, args.prefill)
    return row


def row_limits(given: list, parser) -> dict:
    """``--row-timeout-for`` values as {row: seconds}; a row name not in ROWS or a bad number is an
    error that names the option."""
    limits = {}
    for item in given:
        name, _, seconds = item.rpartition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = None
        if name not in ROWS or value is None or value <= 0:
            parser.error(f"--row-timeout-for takes ROW=SECONDS with ROW one of {', '.join(map(repr, ROWS))} and "
                         f"SECONDS > 0; got {item!r}")
        limits[name] = value
    return limits


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' or a local path")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", choices=("static", "dynamic"), default="static",
                        help="decode's KV cache for every torch row: a StaticCache of prompt + decode slots (quarot: "
                             "its packed static cache, one graph for every position) or the default growing cache")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--only", choices=list(ROWS), help=argparse.SUPPRESS)  # one row, in this process
    parser.add_argument("--paired", action=argparse.BooleanOptionalAction, default=True,
                        help="also time float32 eager in each row's process, in turn with the row, for ratios that "
                             "a drift of the machine's speed between rows does not move (--no-paired: about half "
                             "the time)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--row-timeout", type=float, default=1800,
                        help="seconds a row may take before it is stopped and reported as such (e.g. torchao's "
                             "int8 row on a CPU whose int8 GEMM is slow)")
    parser.add_argument("--row-timeout-for", action="append", default=[], metavar="ROW=SECONDS",
                        help="another limit for one row (repeatable), e.g. --row-timeout-for 'torchao int8 "
                             "dynamic=300' keeps a short limit there without cutting a quarot row's compile")
    args = parser.parse_args(argv)
    limits = row_limits(args.row_timeout_for, parser)
    if args.only:
        try:
            print(json.dumps(measure_one(args.only, args)))
        except ImportError as error:
            print(json.dumps({"model": args.only, "skipped": f"{type(error).__name__}: {error}"}))
        return

    from quarot_fx.kernels import native, native_ops

    header = {"cpu": cpu_summary(), "kernels": native.variant() or native.unavailable_reason(),
              "op_calls": "C++ kernels (native_ops)" if native_ops.load() else native_ops.unavailable_reason(),
              "threads": torch.get_num_threads(), "model": args.model,
              "prefill": args.prefill, "prompt": args.prompt, "decode": args.decode, "repeats": args.repeats,
              "cache": args.cache}
    print(json.dumps(header) if args.json else f"{header['cpu']}, {header['threads']} threads, quarot C kernels: "
          f"{header['kernels']}, op calls: {header['op_calls']}", flush=True)
    rows, skipped = [], []
    for name in args.rows:
        command = [sys.executable, __file__, "--only", name] + [
            f"--{k}={getattr(args, k)}" for k in ("model", "prefill", "prompt", "decode", "repeats", "cache")] + [
            "--paired" if args.paired else "--no-paired"]
        limit = limits.get(name, args.row_timeout)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            row = {"model": name, "skipped": f"not finished after {limit:.0f} s (stopped)"}
        else:
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not lines:
                raise SystemExit(f"row {name!r} failed:\n{done.stderr[-3000:]}")
            row = json.loads(lines[-1])
        (skipped if "skipped" in row else rows).append(row)
        if not args.json:
            print(f"  {name}: " + (row.get("skipped") or f"measured in {row['wall_s']:.0f} s"), flush=True)
    # ratios against float32 eager, else the first measured row; none when every row was skipped
    eager = next((r for r in rows if r["model"] == "float32 eager"), rows[0] if rows else None)
    for row in rows:
        row["prefill_vs_eager"] = row["prefill_s"] / eager["prefill_s"]
        row["prefill_speedup"] = eager["prefill_s"] / row["prefill_s"]
        row["decode_vs_eager"] = row["decode_tok_s"] / eager["decode_tok_s"]
        row["kv_cache_vs_fp16"] = row["kv_cache_bytes"] / row["kv_cache_fp16_bytes"]
    if args.json:
        for row in rows + skipped:
            print(json.dumps(row))
        return
    print(f"\n{args.model}: prefill 1×{args.prefill}, decode {args.decode} tokens after {args.prompt} "
          f"({args.cache} cache), median of {args.repeats}, {header['threads']} threads")
    print(f"{'model':<33} {'prefill s':>9} {'speed×':>7} {'paired×':>7} {'decode tok/s':>12} {'speed×':>7} "
          f"{'paired×':>7} {'step: kernels/overhead ms':>25} {'weights MiB':>11} {'KV MiB':>7} {'× fp16':>6} "
          f"{'peak RSS MiB':>12}")
    for row in rows:
        split = row.get("decode_breakdown")
        split = f"{split['kernel_ms']:.1f} / {split['overhead_ms']:.1f}" if split else ""
        paired = {key: f"{row[key]:7.2f}" if key in row else f"{'':7}"
                  for key in ("paired_prefill_speedup", "paired_decode_speedup")}
        print(f"{row['model']:<33} {row['prefill_s']:9.3f} {row['prefill_speedup']:7.2f} "
              f"{paired['paired_prefill_speedup']} {row['decode_tok_s']:12.1f} {row['decode_vs_eager']:7.2f} "
              f"{paired['paired_decode_speedup']} {split:>25} {row['weight_bytes'] / 2**20:11.1f} "
              f"{row['kv_cache_bytes'] / 2**20:7.1f} {row['kv_cache_vs_fp16']:6.2f} {row['peak_rss_mb']:12.0f}")
    print("speed×: against the float32 eager row (prefill: its time / this row's; decode: tokens/s ratio). paired×: "
          "the same against float32 eager timed in turn with this row in its process (--paired; robust to the "
          "machine's drift between rows). step: one decode step's milliseconds inside kernels (C, Inductor loops, "
          "torch matmuls) / outside them (Python, dispatch, guards, glue)")
    for row in skipped:
        print(f"{row['model']:<33} skipped: {row['skipped']}")
    for row in rows:
        if "quantized_linear_bytes" in row and row["quantized_linear_fp16_bytes"]:
            print(f"\n{row['model']}: quantized linears {row['quantized_linear_bytes'] / 2**20:.1f} MiB packed int4 + "
                  f"scales = {row['quantized_linear_bytes'] / row['quantized_linear_fp16_bytes']:.3f}× their fp16 bytes")
        if row.get("resident_unpacked_bytes"):
            print(f"{row['model']}: unpacked weights kept resident: {row['resident_unpacked_bytes'] / 2**20:.1f} MiB more")
        for key, what in (("op_share", "prefill"), ("op_share_decode", "a decode step")):
            if key in row:
                print(f"{row['model']}: share of {what}'s time: " + ", ".join(
                    f"{k} {v:.1%}" for k, v in sorted(row[key].items(), key=lambda kv: -kv[1])))
        if row.get("int_gemm"):
            print(f"{row['model']}: integer GEMM per shape: " + "; ".join(row["int_gemm"]))


if __name__ == "__main__":
    main()
