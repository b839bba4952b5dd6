"""Perplexity and calibration data, exactly as ../shared/BENCHMARK.md defines them."""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

WINDOW = 2048


HUB_TEXTS = {"wikitext-2": ("wikitext", "wikitext-2-raw-v1", "test"),
             "wikitext-2-valid": ("wikitext", "wikitext-2-raw-v1", "validation")}


def read_eval_text(source: str | Path) -> str:
    """Evaluation text joined the way the protocol says: a file path, or (online) a dataset name.

    ``"wikitext-2"`` / ``"wikitext-2-valid"`` load the raw splits with the ``datasets`` package.
    """
    path = Path(source)
    if path.exists():
        return "\n\n".join(path.read_text(encoding="utf-8").split("\n"))
    if str(source) not in HUB_TEXTS:
        raise FileNotFoundError(f"{source}: no such file, and not one of the known datasets {sorted(HUB_TEXTS)}")
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"reading {source!r} from the hub needs `pip install datasets` and a network; "
                          "or pass the path of a local copy") from err
    name, config, split = HUB_TEXTS[str(source)]
    return "\n\n".join(datasets.load_dataset(name, config, split=split)["text"])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text).input_ids, dtype=torch.long)


def windows(tokens: torch.Tensor, count: int | None = None, length: int = WINDOW) -> list[torch.Tensor]:
    """Non-overlapping windows from the start (``count=None``: all of them)."""
    total = tokens.numel() // length
    count = total if count is None else min(count, total)
    return [tokens[i * length:(i + 1) * length].unsqueeze(0) for i in range(count)]


def calibration_starts(tokens: torch.Tensor, count: int = 32, length: int = WINDOW, seed: int = 0) -> list[int]:
    """Where the calibration windows start: ``random.seed(seed)``, then randint per sample."""
    random.seed(seed)
    return [random.randint(0, tokens.numel() - length - 1) for _ in range(count)]


def calibration_windows(tokens: torch.Tensor, count: int = 32, length: int = WINDOW, seed: int = 0) -> list[torch.Tensor]:
    """Random windows of the calibration split (BENCHMARK.md)."""
    return [tokens[s:s + length].unsqueeze(0) for s in calibration_starts(tokens, count, length, seed)]


def unseen_windows(tokens: torch.Tensor, count: int, calibration_count: int = 32, length: int = WINDOW,
                   seed: int = 0) -> list[torch.Tensor]:
    """``count`` non-overlapping windows of the calibration split that share no token with its
    calibration windows (so with nothing calibration or learning saw): validation text."""
    taken = calibration_starts(tokens, calibration_count, length, seed)
    found, start = [], 0
    while len(found) < count and start + length <= tokens.numel():
        clash = next((s for s in taken if s < start + length and start < s + length), None)
        if clash is None:
            found.append(tokens[start:start + length].unsqueeze(0))
            start += length
        else:
            start = clash + length
    return found


@torch.no_grad()
def perplexity(model, token_windows: list[torch.Tensor], progress: bool = True, desc: str = "perplexity",
               use_cache: bool = False) -> float:
    """exp(mean NLL) of tokens 1..L-1 of every window, each predicted from its own prefix.
    ``use_cache``: each window is a prefill into a fresh KV cache (a quarot model's packed cache,
    the path generation takes), not a cache-free forward."""
    nll, count = 0.0, 0
    for ids in tqdm(token_windows, desc=desc, disable=not progress, leave=False):
        logits = model(ids, use_cache=use_cache).logits[0, :-1].float()
        targets = ids[0, 1:]
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += targets.numel()
    return math.exp(nll / count)
