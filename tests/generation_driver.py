"""The compiled forward driven by hand, step by step: what ``compiled.generate()`` must equal.

Greedy, multinomial sampling (no top-k/top-p/temperature: ``top_k=0``) and beam search (no EOS:
``min_new_tokens`` equals ``max_new_tokens``, so every beam has the same length and the best one
has the highest summed log-probability). The calls pass what ``generate`` passes, by keyword (positions
from the attention mask, ``logits_to_keep=1``), and beam search reorders the cache with the cache's own
``reorder_cache`` as transformers does.
"""

from __future__ import annotations

import torch

EOS = 2  # tiny_models' eos_token_id


def generation_kwargs(steps: int, mode: str, beams: int = 1, **extra) -> dict:
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0, eos_token_id=EOS, **extra)
    if mode == "sample":
        return {**kwargs, "do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    return {**kwargs, "do_sample": False, "num_beams": beams}


def positions(mask: torch.Tensor) -> torch.Tensor:
    """The prompt's positions as transformers' generate makes them; each new token then takes the
    previous last position + 1 (with right padding that follows the pad, as generate does)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def drive(compiled, ids: torch.Tensor, mask: torch.Tensor | None, steps: int, mode: str, beams: int = 1,
          cache=None) -> torch.Tensor:
    """The new tokens (best beam per row for beam search), by the compiled forward."""
    width = beams if mode == "beams" else 1
    ids = ids.repeat_interleave(width, 0)
    mask = (torch.ones_like(ids) if mask is None else mask).repeat_interleave(width, 0)
    rows = ids.shape[0] // width
    scores = torch.zeros(rows, width)
    scores[:, 1:] = -1e9  # the first step expands the first beam only
    sequence, step_input, position = ids, ids, positions(mask)
    with torch.no_grad():
        for _ in range(steps):
            out = compiled(input_ids=step_input, cache=cache, attention_mask=mask, position_ids=position,
                           use_cache=True, logits_to_keep=1, return_dict=True)
            cache = out.past_key_values
            logits = out.logits[:, -1, :].to(dtype=torch.float32)
            logits[:, EOS] = -float("inf")  # min_new_tokens
            if mode == "greedy":
                chosen = logits.argmax(-1)
                order = torch.arange(ids.shape[0])
            elif mode == "sample":
                chosen = torch.multinomial(torch.softmax(logits, -1), num_samples=1).squeeze(1)
                order = torch.arange(ids.shape[0])
            else:
                vocab = logits.shape[-1]
                total = (scores.reshape(-1, 1) + torch.log_softmax(logits, -1)).reshape(rows, width * vocab)
                scores, flat = total.topk(width, dim=1)
                order = (torch.arange(rows)[:, None] * width + flat // vocab).reshape(-1)
                chosen = (flat % vocab).reshape(-1)
                cache.reorder_cache(order)
            sequence = torch.cat([sequence[order], chosen[:, None]], dim=1)
            mask = torch.cat([mask[order], torch.ones_like(mask[:, :1])], dim=1)
            step_input, position = chosen[:, None], position[:, -1:] + 1
    return sequence[::width, ids.shape[1]:]
