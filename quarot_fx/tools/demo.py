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
from .footprint import (cache_bytes, cpu_summary, fp16_cache_bytes, fp16_weight_bytes, model_weight_bytes,
                        quarot_weight_bytes)
from .models import load_model

PROMPT = "The capital of France is"
BEST_ARTIFACT = Path("quarot-artifacts/w4a4kv4-best")  # where `make demo-best` saves it (relative to the checkout)
BEST_COMMAND = ("python -m quarot_fx.cli quantize smollm2-135m --preset w4a4kv4 --weights gptq "
                "--option smoothrot=true --option a_clip=gbs --option kv_clip=gbs --option gbs_objective=local "
                "--option gbs_windows=2 --calib ../shared/data/wikitext-2/wiki.valid.tokens -o {dir}")
DECODE_WARMUP, DECODE_STEPS = 3, 24  # decode speed: tokens/s over 24 greedy steps after 3 untimed ones


@dataclass
class Row:
    name: str
    perplexity: float | None
    continuation: str
    weights_vs_fp16: float
    kv_vs_fp16: float
    tokens_per_second: float
    seconds: float


class _TokenClock:
    """A ``generate`` streamer that only notes when each token arrives (the prompt first)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, _tokens) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """generate() calls it after the last token: nothing left to note."""


def generation_figures(model, tokenizer, prompt: str, steps: int) -> tuple[str, float, float]:
    """(greedy continuation of ``steps`` tokens, decode tokens/s, KV-cache bytes per cached token).

    Both figures come from ``generate`` itself, the graphs the continuation compiled: a second,
    timed run of DECODE_STEPS tokens after the same prompt compiles nothing (a separate decode
    loop would call the model another way and compile two more graphs per row). Its first decode
    steps are left out of the rate (a first distinct cache length recompiles there)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=eos)
        continuation = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        clock, new = _TokenClock(), DECODE_WARMUP + DECODE_STEPS
        timed = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=eos,
                               streamer=clock, return_dict_in_generate=True)
    times = clock.times[1 + DECODE_WARMUP:]  # [0]: the prompt; then one per token
    cached = ids.shape[1] + new - 1  # the last token is never fed back
    return continuation, (len(times) - 1) / (times[-1] - times[0]), cache_bytes(timed.past_key_values) / cached


def measure(name: str, runnable, base, tokenizer, evaluation, steps: int) -> Row:
    """One row: ``runnable`` is the float model or a quarot-compiled one over ``base``."""
    start = time.perf_counter()
    with collect_reports() as reports:
        ppl = perplexity(runnable, evaluation, desc=name) if evaluation else None
        continuation, tokens_per_second, kv_per_token = generation_figures(runnable, tokenizer, PROMPT, steps)
    weights = quarot_weight_bytes(reports)["weight_bytes"] if reports else model_weight_bytes(base)
    return Row(name, ppl, continuation, weights / fp16_weight_bytes(base),
               kv_per_token / fp16_cache_bytes(base.config, 1), tokens_per_second, time.perf_counter() - start)


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
    evaluation = windows(tokenize(tokenizer, read_eval_text(text_path)), n_windows) if text_path else None
    configs = [("float32", None), (f"{preset}, no rotation", {"preset": preset, "rotation": "none"}),
               (f"{preset}, rotated (QuaRot)", {"preset": preset})]
    if not quick:
        configs.append(("w8a8kv8, rotated", {"preset": "w8a8kv8"}))
    rows = []
    for name, options in configs:
        torch._dynamo.reset()
        runnable = model if options is None else torch.compile(model, backend="quarot",
                                                               options={**options, "lowering": lowering})
        rows.append(measure(name, runnable, model, tokenizer, evaluation, steps))
        print(f"  {name}: measured in {rows[-1].seconds:.0f} s", flush=True)
    if not quick:
        best = Path(best)
        if (best / MANIFEST).exists():
            torch._dynamo.reset()
            options = json.loads((best / MANIFEST).read_text()).get("options", {})
            loaded = quarot_fx.load(best, model, lowering=lowering)
            rows.append(measure(f"best saved: {best.name}", loaded, model, tokenizer, evaluation, steps))
            print(f"  best saved ({best}: {', '.join(f'{k}={v}' for k, v in options.items())}): measured in "
                  f"{rows[-1].seconds:.0f} s", flush=True)
        else:
            print(f"  the best W4A4KV4 (GPTQ + SmoothRot + GBS clips) is not shown: no artifact at {best}. Make it "
                  f"once with `make demo-best` (16-20 minutes on 2 cores), i.e.\n    {BEST_COMMAND.format(dir=best)}")
    print_table(rows)
    print(f"\nperplexity: {n_windows} WikiText-2 test windows of 2048 tokens" if evaluation else
          "\nperplexity: no evaluation text given (--text)", end="")
    print(f"; decode: {DECODE_STEPS} greedy tokens of generate() after the prompt and {DECODE_WARMUP} untimed ones, "
          f"growing cache (lowering {lowering!r}; `benchmarks/speed.py` measures Inductor's lowering and a static "
          "cache); KV cache: bytes per cached token.")
    if any(row.name.startswith("w8a8") for row in rows):
        print("w8a8kv8: integer kernels cover 4-bit weights; 8-bit weights run simulated (float32 matmuls on their "
              "dequantized values), so they hold float32 bytes here.")
    print(f"Whole demo: {time.perf_counter() - started:.0f} s")
    return rows

