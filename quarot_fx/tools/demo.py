"""``make demo``: what 4-bit costs and buys on SmolLM2-135M, in one table from one run.

Rows: float; W4A4KV4 without rotation and with it (the QuaRot effect); W8A8KV8 rotated (near
lossless); and the best W4A4KV4 configuration the project has, when its saved artifact is present
(``make demo-best`` makes it once). Columns: perplexity on evaluation windows, the greedy
continuation of a prompt, weight and KV-cache bytes against fp16, and decode tokens/s against
float, all measured here, now. ``--quick`` keeps the first three rows.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifact import MANIFEST
from ..report import collect_reports
from .evaluate import perplexity, read_eval_text, tokenize, windows
from .footprint import (cpu_summary, decode_seconds, fp16_cache_bytes, fp16_weight_bytes, model_weight_bytes,
                        prefill_cache_bytes, quarot_weight_bytes)
from .models import load_model

PROMPT = "The capital of France is"
BEST_ARTIFACT = Path("quarot-artifacts/w4a4kv4-best")  # where `make demo-best` saves it (relative to the checkout)
BEST_COMMAND = ("python -m quarot_fx.cli quantize smollm2-135m --preset w4a4kv4 --weights gptq "
                "--option smoothrot=true --option a_clip=gbs --option kv_clip=gbs --option gbs_objective=local "
                "--option gbs_windows=2 --calib ../shared/data/wikitext-2/wiki.valid.tokens -o {dir}")
DECODE_PROMPT, DECODE_STEPS = 64, 24  # decode speed: tokens/s over 24 greedy steps after 64 tokens


@dataclass
class Row:
    name: str
    perplexity: float | None
    continuation: str
    weights_vs_fp16: float
    kv_vs_fp16: float
    tokens_per_second: float
    seconds: float


def greedy(model, tokenizer, prompt: str, steps: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def measure(name: str, runnable, base, tokenizer, evaluation, decode_ids, steps: int) -> Row:
    """One row: ``runnable`` is the float model or a quarot-compiled one over ``base``."""
    start = time.perf_counter()
    with collect_reports() as reports:
        ppl = perplexity(runnable, evaluation, desc=name) if evaluation else None
        continuation = greedy(runnable, tokenizer, PROMPT, steps)
        # the growing cache generate() used: its graphs are compiled already (a static cache would
        # compile two more per row); the first run compiles nothing new but warms the kernels' choices
        decode_seconds(runnable, decode_ids, DECODE_STEPS, "dynamic")
        tokens_per_second = DECODE_STEPS / decode_seconds(runnable, decode_ids, DECODE_STEPS, "dynamic")
        kv = prefill_cache_bytes(runnable, decode_ids)
    weights = quarot_weight_bytes(reports)["weight_bytes"] if reports else model_weight_bytes(base)
    return Row(name, ppl, continuation, weights / fp16_weight_bytes(base),
               kv / fp16_cache_bytes(base.config, decode_ids.shape[1]), tokens_per_second,
               time.perf_counter() - start)


def print_table(rows: list[Row]) -> None:
    float_speed = rows[0].tokens_per_second
    print(f"\n{'':<34} {'perplexity':>10} {'weights':>8} {'KV cache':>8} {'decode tok/s':>17}  continuation")
    print(f"{'':<34} {'':>10} {'× fp16':>8} {'× fp16':>8} {'(× float)':>17}")
    for row in rows:
        ppl = f"{row.perplexity:10.2f}" if row.perplexity is not None else f"{'-':>10}"
        speed = f"{row.tokens_per_second:6.1f} ({row.tokens_per_second / float_speed:4.2f}×)"
        print(f"{row.name:<34} {ppl} {row.weights_vs_fp16:8.2f} {row.kv_vs_fp16:8.2f} {speed:>17}  "
              f"{PROMPT + row.continuation!r}")


def run_demo(model_name: str, text_path: str | None, n_windows: int, preset: str, lowering: str, steps: int,
             quick: bool = False, best: str | Path = BEST_ARTIFACT) -> list[Row]:
    import quarot_fx

    started = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = load_model(model_name)
    print(f"{model_name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
          f"{cpu_summary()}, {torch.get_num_threads()} threads")
    evaluation = decode_ids = None
    if text_path:
        tokens = tokenize(tokenizer, read_eval_text(text_path))
        evaluation = windows(tokens, n_windows)
        decode_ids = tokens[None, :DECODE_PROMPT]
    if decode_ids is None:
        decode_ids = torch.randint(0, model.config.vocab_size, (1, DECODE_PROMPT), generator=torch.Generator().manual_seed(0))
    configs = [("float32", None), (f"{preset}, no rotation", {"preset": preset, "rotation": "none"}),
               (f"{preset}, rotated (QuaRot)", {"preset": preset})]
    if not quick:
        configs.append(("w8a8kv8, rotated", {"preset": "w8a8kv8"}))
    rows = []
    for name, options in configs:
        torch._dynamo.reset()
        runnable = model if options is None else torch.compile(model, backend="quarot",
                                                               options={**options, "lowering": lowering})
        rows.append(measure(name, runnable, model, tokenizer, evaluation, decode_ids, steps))
        print(f"  {name}: measured in {rows[-1].seconds:.0f} s", flush=True)
    if not quick:
        best = Path(best)
        if (best / MANIFEST).exists():
            torch._dynamo.reset()
            options = json.loads((best / MANIFEST).read_text()).get("options", {})
            loaded = quarot_fx.load(best, model, lowering=lowering)
            rows.append(measure(f"best saved: {best.name}", loaded, model, tokenizer, evaluation, decode_ids, steps))
            print(f"  best saved ({best}: {', '.join(f'{k}={v}' for k, v in options.items())}): measured in "
                  f"{rows[-1].seconds:.0f} s", flush=True)
        else:
            print(f"  the best W4A4KV4 (GPTQ + SmoothRot + GBS clips) is not shown: no artifact at {best}. Make it "
                  f"once with `make demo-best` (about 15 minutes here), i.e.\n    {BEST_COMMAND.format(dir=best)}")
    print_table(rows)
    print(f"\nperplexity: {n_windows} WikiText-2 test windows of 2048 tokens" if evaluation else
          "\nperplexity: no evaluation text given (--text)", end="")
    print(f"; decode: {DECODE_STEPS} greedy tokens after {DECODE_PROMPT} with the growing cache "
          f"(lowering {lowering!r}; `benchmarks/speed.py` measures Inductor's lowering and a static cache); "
          f"KV cache after {DECODE_PROMPT} tokens.")
    if any(row.name.startswith("w8a8") for row in rows):
        print("w8a8kv8: integer kernels cover 4-bit weights; 8-bit weights run simulated (float32 matmuls on their "
              "dequantized values), so they hold float32 bytes here.")
    print(f"Whole demo: {time.perf_counter() - started:.0f} s")
    return rows

