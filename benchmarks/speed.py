"""Speed and memory of W4A4KV4 through the quarot backend against float32, on this CPU.

    python benchmarks/speed.py [--model smollm2-135m] [--prefill 2048] [--prompt 512]
                               [--decode 64] [--repeats 5] [--json]

One run, three models on the same inputs (BENCHMARK.md: median of ≥ 5 after warm-up,
default thread count): float32 eager, float32 ``torch.compile`` (inductor), and W4A4KV4
``backend="quarot"`` (inductor lowering, integer kernels). Rows:

* prefill: latency of one 1×``prefill`` forward with a fresh cache (logits of the last
  position only, as generation's first step computes them);
* decode: tokens/s over ``decode`` greedy steps after a ``prompt``-token prefill;
* weights: bytes of the weights each compiled model holds, and for quarot the quantized
  linears against their fp16 size; peak RSS of the process after each model;
* for quarot, the share of prefill time in each quarot_fx op (torch.profiler), the online
  Hadamards (alone or fused into activation quantization) among them.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from common import cpu_summary, median_seconds

import quarot_fx
from quarot_fx.kernels import int_gemm

HADAMARD_EVENTS = ("quarot_fx::hadamard_transform", "quarot_fx::hadamard (fused)")
QUANTIZED_LINEAR = "quarot_fx.quantized_linear.default"


def prefill_fn(model, ids):
    def run():
        with torch.no_grad():
            return model(ids, use_cache=True, logits_to_keep=1)
    return run


def decode_seconds(model, prompt, steps: int) -> float:
    """Seconds for ``steps`` greedy decode steps after prefilling ``prompt`` (prefill not timed)."""
    with torch.no_grad():
        out = model(prompt, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - start


def unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def quarot_weight_bytes(reports) -> dict:
    """Bytes of the constants the compiled graphs hold (shared across recompiles), and the
    quantized linears' packed weights + scales against the fp16 bytes of the same matrices."""
    constants, packed, fp16 = [], [], 0
    seen_linear = set()
    for report in reports:
        gm = report.graph_module
        constants += [b for _, b in gm.named_buffers()]
        for node in gm.graph.nodes:
            if str(node.target) != QUANTIZED_LINEAR:
                continue
            weight, scale = getattr(gm, node.args[2].target), getattr(gm, node.args[3].target)
            if weight.data_ptr() in seen_linear:
                continue
            seen_linear.add(weight.data_ptr())
            packed += [weight, scale]
            fp16 += 2 * weight.shape[0] * node.args[5]
    return {"weight_bytes": unique_bytes(constants), "quantized_linear_bytes": unique_bytes(packed),
            "quantized_linear_fp16_bytes": fp16}


def op_shares(model, ids) -> dict:
    """Share of one prefill's wall time spent in each quarot_fx op (and in the Hadamards)."""
    run = prefill_fn(model, ids)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        wall_us = (time.perf_counter() - start) * 1e6
    shares = {e.key: e.cpu_time_total / wall_us for e in prof.key_averages() if e.key.startswith("quarot_fx::")}
    shares["online Hadamards"] = sum(shares.get(k, 0.0) for k in HADAMARD_EVENTS)
    return shares


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name, model, prefill_ids, prompt_ids, args) -> dict:
    row = {"model": name}
    with quarot_fx.collect_reports() as reports:
        start = time.perf_counter()
        row["prefill_s"] = median_seconds(prefill_fn(model, prefill_ids), args.repeats)
        runs = [decode_seconds(model, prompt_ids, args.decode) for _ in range(args.repeats + 1)][1:]
        row["decode_tok_s"] = args.decode / sorted(runs)[len(runs) // 2]
        row["wall_s"] = time.perf_counter() - start
    if reports:
        row.update(quarot_weight_bytes(reports))
        row["op_share"] = op_shares(model, prefill_ids)
        row["graphs"] = len(reports)
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' or a local path")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--options", default='{"preset": "w4a4kv4"}', help="quarot options (JSON)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from quarot_fx.tools.models import load_model

    model = load_model(args.model)[0]
    g = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(0, model.config.vocab_size, (1, args.prefill), generator=g)
    prompt_ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=g)
    float_bytes = unique_bytes(list(model.parameters()) + list(model.buffers()))
    options = json.loads(args.options)
    candidates = [("float32 eager", lambda: model),
                  ("float32 inductor", lambda: torch.compile(model)),
                  (f"quarot {options.get('preset', options)}", lambda: torch.compile(model, backend="quarot",
                                                                                       options=options))]
    rows = []
    for name, make in candidates:
        torch._dynamo.reset()
        row = measure(name, make(), prefill_ids, prompt_ids, args)
        row.setdefault("weight_bytes", float_bytes)
        rows.append(row)
        if not args.json:
            print(f"  measured {name} in {row['wall_s']:.0f} s", flush=True)
    gemm = [f"{d.rows}x{d.in_features}->{d.out_features}: {d.choice} ({d.by})" for d in int_gemm.decisions()]
    eager = rows[0]
    for row in rows:
        row["prefill_vs_eager"] = row["prefill_s"] / eager["prefill_s"]
        row["decode_vs_eager"] = row["decode_tok_s"] / eager["decode_tok_s"]
    if args.json:
        print(json.dumps({"cpu": cpu_summary(), "threads": torch.get_num_threads(), "int_gemm": gemm}))
        for row in rows:
            print(json.dumps(row))
        return
    print(f"\n{cpu_summary()}; integer GEMM per shape (rows bucket): " + ("; ".join(gemm) or "none"))
    print(f"{args.model}: prefill 1×{args.prefill}, decode {args.decode} tokens after {args.prompt}, "
          f"median of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"{'model':<18} {'prefill s':>9} {'× eager':>8} {'decode tok/s':>12} {'× eager':>8} "
          f"{'weights MiB':>11} {'peak RSS MiB':>12}")
    for row in rows:
        print(f"{row['model']:<18} {row['prefill_s']:9.3f} {row['prefill_vs_eager']:8.2f} "
              f"{row['decode_tok_s']:12.1f} {row['decode_vs_eager']:8.2f} {row['weight_bytes'] / 2**20:11.1f} "
              f"{row['peak_rss_mb']:12.0f}")
    quarot = rows[-1]
    if "quantized_linear_bytes" in quarot and quarot["quantized_linear_fp16_bytes"]:
        print(f"\nquantized linears: {quarot['quantized_linear_bytes'] / 2**20:.1f} MiB packed int4 + scales = "
              f"{quarot['quantized_linear_bytes'] / quarot['quantized_linear_fp16_bytes']:.3f}× their fp16 bytes")
    if "op_share" in quarot:
        print("share of quarot prefill time: " + ", ".join(
            f"{k} {v:.1%}" for k, v in sorted(quarot["op_share"].items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
