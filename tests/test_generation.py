"""generate() on a quarot-compiled model: quantized at every step of every call, in every mode.

Issue 29, rows 1-2: past Dynamo's recompile limit a call used to run the float model for some
steps; beam search's cache reordering made the cache "foreign". Every test compares with the
compiled forward (a fresh compile, or the same model driven by hand), never with tolerance.
"""

import pytest
import torch
from generation_driver import drive, generation_kwargs
from tiny_models import tiny_model, token_ids

import quarot_fx

W4 = {"preset": "w4a4kv4", "lowering": "fx"}


def left_padded(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = token_ids(batch=batch, length=length, seed=seed)
    mask = torch.ones_like(ids)
    for row in range(1, batch):  # rows shorter by 0, 1, 2, ... tokens, padded on the left
        mask[row, :min(row % 3, length - 1)] = 0
    return ids.masked_fill(mask == 0, 0), mask


# 20 calls: batch 1-8, prompt lengths 1-13, with and without a mask, greedy, sampling, beams
CALLS = [(1, 5, "greedy", 1, False), (2, 7, "greedy", 1, True), (3, 4, "sample", 1, True), (1, 11, "greedy", 1, False),
         (4, 9, "greedy", 1, True), (2, 3, "beams", 2, True), (8, 6, "greedy", 1, True), (1, 1, "greedy", 1, False),
         (5, 13, "sample", 1, True), (1, 8, "beams", 3, False), (6, 2, "greedy", 1, True), (2, 10, "beams", 4, True),
         (7, 5, "greedy", 1, True), (1, 3, "sample", 1, False), (3, 12, "greedy", 1, False), (2, 6, "greedy", 1, True),
         (8, 9, "sample", 1, True), (1, 7, "beams", 2, False), (4, 4, "greedy", 1, False), (3, 8, "beams", 2, True)]


def generated(compiled, call, seed):
    batch, length, mode, beams, masked = call
    ids, mask = left_padded(batch, length, seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = compiled.generate(ids, attention_mask=mask if masked else None, return_dict_in_generate=True,
                                output_logits=True, **generation_kwargs(3, mode, beams))
    return out.sequences, torch.stack(out.logits)


def test_twenty_mixed_generate_calls_equal_fresh_compiles_at_every_step():
    model = tiny_model("llama", layers=1)
    fresh = []
    for seed, call in enumerate(CALLS):
        torch._dynamo.reset()
        fresh.append(generated(quarot_fx.compile(model, **W4), call, seed))
    torch._dynamo.reset()
    compiled = quarot_fx.compile(model, **W4)
    with quarot_fx.collect_reports() as reports:
        for seed, call in enumerate(CALLS):
            tokens, logits = generated(compiled, call, seed)
            assert torch.equal(tokens, fresh[seed][0]), call
            assert torch.equal(logits, fresh[seed][1]), call
    assert len(reports) <= 12, len(reports)  # a handful of graphs for 20 calls, not one per shape


def test_past_the_recompile_limit_a_call_raises_instead_of_running_the_float_model():
    model = tiny_model("llama", layers=1)
    compiled = quarot_fx.compile(model, **W4)
    with torch._dynamo.config.patch(recompile_limit=1), torch.no_grad():  # a limit the user set is kept
        compiled(token_ids(length=4), use_cache=False)
        with pytest.raises(quarot_fx.RecompileLimitError, match="FLOAT model.*recompile_limit"):
            compiled(token_ids(length=4), use_cache=True)  # another graph: the cache is an input


@pytest.mark.parametrize("preset", ["fp", "w4a4kv4"])
@pytest.mark.parametrize("beams,batch", [(2, 1), (3, 2), (4, 1)])
def test_beam_search_equals_the_compiled_forward_driven_by_hand(preset, beams, batch):
    model = tiny_model("llama")
    compiled = quarot_fx.compile(model, preset=preset, lowering="fx")
    ids, mask = left_padded(batch, 6, seed=beams)
    with torch.no_grad():
        out = compiled.generate(ids, attention_mask=mask, **generation_kwargs(4, "beams", beams))
    assert torch.equal(out[:, ids.shape[1]:], drive(compiled, ids, mask, 4, "beams", beams))


def prefill(compiled, ids):
    with torch.no_grad():
        return compiled(ids, use_cache=True).past_key_values


def decode(compiled, token, cache):
    with torch.no_grad():
        return compiled(token, cache=cache, use_cache=True).logits[:, -1]


def same(a, b):
    """Equal up to float GEMMs of another row count rounding differently (batch 2 vs 4)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["fp", "w4a4kv4"])
def test_every_cache_operation_keeps_the_cache_the_models_own(preset):
    model = tiny_model("llama")
    compiled = quarot_fx.compile(model, preset=preset, lowering="fx")
    ids = token_ids(batch=2, length=6)
    nxt = token_ids(batch=2, length=1, seed=7)
    reference = decode(compiled, nxt, prefill(compiled, ids))

    cache = prefill(compiled, ids)  # reorder (beam search): rows swapped
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(decode(compiled, nxt.flip(0), cache), reference.flip(0))

    cache = prefill(compiled, ids)  # repeat (beam/sample expansion), then select the copies back
    cache.batch_repeat_interleave(2)
    same(decode(compiled, nxt.repeat_interleave(2, 0), cache), reference.repeat_interleave(2, 0))
    cache = prefill(compiled, ids)
    cache.batch_select_indices(torch.tensor([1]))
    same(decode(compiled, nxt[1:], cache), decode(compiled, nxt[1:], prefill(compiled, ids[1:])))

    cache = prefill(compiled, torch.cat([ids, nxt], dim=1))  # crop (assisted decoding): the last token undone
    cache.crop(-1)
    assert torch.equal(decode(compiled, nxt, cache), reference)


def test_a_cache_the_eager_model_appended_to_is_still_refused():
    model = tiny_model("llama")
    compiled = quarot_fx.compile(model, **W4)
    with torch.no_grad():
        cache = compiled(token_ids(length=6), use_cache=True).past_key_values  # ours so far
        model(token_ids(length=1), cache=cache, use_cache=True)  # the float model adds a token
        with pytest.raises(quarot_fx.ForeignCacheError, match="same compiled model"):
            compiled(token_ids(length=1), cache=cache, use_cache=True)
