"""``make demo``: SmolLM2-135M at W4A4KV4 through ``backend="quarot"``, float vs unrotated vs rotated."""

from __future__ import annotations

import time

import torch

from .evaluate import perplexity, read_eval_text, tokenize, windows
from .models import load_model
from ..report import collect_reports

PROMPT = "The capital of France is"


def greedy(model, tokenizer, prompt: str, steps: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def linear_megabytes(model) -> float:
    return sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head") / 2**20


def run_demo(model_name: str, text_path: str | None, n_windows: int, preset: str, lowering: str, steps: int) -> None:
    model, tokenizer = load_model(model_name)
    print(f"{model_name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"linear weights {linear_megabytes(model):.1f} MiB in float32")
    evaluation = None
    if text_path:
        evaluation = windows(tokenize(tokenizer, read_eval_text(text_path)), n_windows)
    configs = [("float", None), (f"{preset}, no rotation", {"preset": preset, "rotation": "none"}),
               (f"{preset}, rotated (QuaRot)", {"preset": preset})]
    for name, options in configs:
        torch._dynamo.reset()
        start = time.perf_counter()
        if options is not None:
            model.forward = torch.compile(model.forward, backend="quarot", options={**options, "lowering": lowering})
        line = f"{name:<28}"
        with collect_reports() as reports:
            if evaluation:
                line += f" ppl {perplexity(model, evaluation, desc=name):8.2f} ({len(evaluation)} windows)"
            line += f" | {PROMPT!r} → {greedy(model, tokenizer, PROMPT, steps)!r}"
        print(line + f"  [{time.perf_counter() - start:.0f} s]", flush=True)
        if options is not None:
            del model.forward  # back to the eager forward
    counters = reports[0].counters if reports else {}
    if counters.get("packed_bytes"):
        print(f"integer kernels: quantized linears hold {counters['packed_bytes'] / 2**20:.2f} MiB packed int4 + "
              f"scales, {counters['packed_bytes'] / counters['packed_fp16_bytes']:.3f}× their fp16 size; "
              f"{counters['fused_hadamards']} online Hadamards fused into activation quantization")
    else:
        print(f"{preset}: weights run simulated (integer kernels cover 4-bit weights)")
