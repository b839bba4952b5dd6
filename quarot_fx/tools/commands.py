"""The bodies of the ``quarot-fx`` verbs that work on real models: quantize, eval, explain, generate.

MODEL is ``smollm2-135m``, a local Hugging Face directory, or a GGUF file (transformers reads it
with ``gguf_file=``); DIR is a directory written by ``quantize`` (``quarot_fx.save``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

import quarot_fx
from quarot_fx.artifact import MANIFEST, ArtifactError, read_manifest

from .evaluate import WINDOW, calibration_windows, perplexity, read_eval_text, tokenize, windows
from .models import load_model


def is_artifact(target: str) -> bool:
    return os.path.isfile(os.path.join(target, MANIFEST))


def is_compressed_tensors(target: str) -> bool:
    """A directory ``export`` wrote (or any compressed-tensors checkpoint)."""
    config = os.path.join(target, "config.json")
    if not os.path.isfile(config):
        return False
    method = json.loads(Path(config).read_text()).get("quantization_config", {}).get("quant_method")
    return method == "compressed-tensors"


def base_model(target: str):
    """(model, tokenizer) of MODEL: smollm2-135m, a local directory, or a GGUF file."""
    if target.lower().endswith(".gguf"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = os.path.split(os.path.abspath(target))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return load_model(target)


def source_of(target: str) -> str:
    """How a manifest names MODEL so that ``load`` can find it again."""
    return target if target.lower() in ("smollm2-135m", "smollm2") else os.path.abspath(target)


def source_in(target: str, manifest: dict) -> str:
    source = manifest.get("source")
    if not isinstance(source, str) or not source:
        raise ArtifactError(f"{target}/{MANIFEST} does not record its base model ('source'); load it from Python "
                            "with quarot_fx.load(DIR, model=...)")
    return source


def model_for(target: str, options: dict | None):
    """(runnable model, tokenizer, what it is): a saved DIR loaded, or MODEL float or compiled."""
    if is_artifact(target):
        if options:
            raise ValueError(f"{target} is already quantized; drop --preset / --option")
        manifest = read_manifest(target)
        model, tokenizer = base_model(source_in(target, manifest))
        return quarot_fx.load(target, model), tokenizer, f"{target} (saved {manifest['options'].get('preset')})"
    if is_compressed_tensors(target):
        if options:
            raise ValueError(f"{target} is a compressed-tensors checkpoint; drop --preset / --option")
        from transformers import AutoTokenizer

        from quarot_fx.exporter import load_compressed_tensors

        return load_compressed_tensors(target), AutoTokenizer.from_pretrained(target), f"{target} (compressed-tensors)"
    model, tokenizer = base_model(target)
    if not options:
        return model, tokenizer, f"{target} (float)"
    return quarot_fx.compile(model, **options), tokenizer, f"{target} {options}"


def quantize(target: str, options: dict, calib: str | None, calib_windows: int, out: str, length: int = WINDOW) -> dict:
    """Compile MODEL with ``options`` (calibrating on ``calib`` where they need it), run it once on
    a full window so every graph is built, and save the result to ``out``."""
    config = quarot_fx.QuaRotConfig.from_options({**options, "calibration": [torch.zeros(1, dtype=torch.long)]})
    if not calib and (config.calibrates_weights or config.smoothrot or config.searches_clips):
        raise ValueError("these options calibrate (GPTQ/OBR, sparsity, SmoothRot or GBS): pass --calib FILE "
                         "(calibration text, never the evaluation text)")
    model, tokenizer = base_model(target)
    tokens = tokenize(tokenizer, read_eval_text(calib)) if calib else None
    if tokens is not None:
        if tokens.numel() <= length:
            raise ValueError(f"--calib has {tokens.numel()} tokens: fewer than one {length}-token window")
        options = {**options, "calibration": calibration_windows(tokens, calib_windows, length)}
    compiled = quarot_fx.compile(model, **options)
    first = (tokens[:length] if tokens is not None else torch.arange(length) % model.config.vocab_size)[None]
    with torch.no_grad():
        compiled(first)
    quarot_fx.save(compiled, out, source=source_of(target))
    return {"model": target, "options": {k: v for k, v in options.items() if k != "calibration"}, "saved": out}


def export(target: str, out: str, format: str, approximate: list[str], overwrite: bool = False,
           online_transforms: bool = True) -> dict:
    """Load a saved DIR (no calibration), build its graphs on a short input, write ``format`` to ``out``
    (never over DIR itself; over a non-empty ``out`` only with ``overwrite``)."""
    from quarot_fx.directories import same_directory
    from quarot_fx.exporter import export as export_model

    if not is_artifact(target):
        raise ValueError(f"{target} is not a directory written by 'quarot-fx quantize' (no {MANIFEST})")
    if same_directory(target, out):
        raise ValueError(f"-o {out} is the saved DIR itself: export to another directory")
    model, tokenizer = base_model(source_in(target, read_manifest(target)))
    compiled = quarot_fx.load(target, model, lowering="fx")  # the weights are the same; fx starts at once
    with torch.no_grad():
        compiled(torch.arange(16)[None] % model.config.vocab_size)
    done = export_model(compiled, out, format, approximate=tuple(approximate), tokenizer=tokenizer, overwrite=overwrite,
                        online_transforms=online_transforms)
    return {"saved": target, "format": format, "exported": str(done.path), "approximations": done.approximations,
            "left_out": done.left_out, "notes": done.notes}


def evaluate(target: str, options: dict | None, text: str, count: int | None, length: int = WINDOW) -> dict:
    model, tokenizer, what = model_for(target, options)
    chunks = windows(tokenize(tokenizer, read_eval_text(text)), count, length)
    if not chunks:
        raise ValueError(f"--text holds fewer than {length} tokens: no window to evaluate")
    return {"model": what, "text": text, "windows": len(chunks), "ppl": round(perplexity(model, chunks), 4)}


def generate(target: str, options: dict | None, prompt: str, steps: int) -> str:
    if not prompt.strip():
        raise ValueError("--prompt is empty: give some text to continue")
    model, tokenizer, _ = model_for(target, options)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise ValueError(f"--prompt {prompt!r} gives no tokens: give some text to continue")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def explain(target: str, options: dict, tokens: int) -> str:
    model, _ = base_model(target)
    ids = torch.arange(tokens)[None] % model.config.vocab_size
    return str(quarot_fx.explain(model, ids, **options))


def outliers(target: str, text: str, tokens: int, smoothrot: bool, out: str) -> dict:
    from .outliers import input_maxima, plot

    model, tokenizer = base_model(target)
    ids = tokenize(tokenizer, read_eval_text(text))[:tokens][None]
    maxima = input_maxima(model, ids, smoothrot=smoothrot)
    plot(maxima, f"{target}: largest |activation| a quantizer would see ({ids.shape[1]} tokens)", Path(out))
    return {"model": target, "tokens": ids.shape[1], "picture": out,
            "max": {stage: round(max(values.values()), 3) for stage, values in maxima.items()}}
