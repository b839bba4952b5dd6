"""Generation fuzzer: ``compiled.generate()`` equals the compiled forward driven step by step.

Over batch sizes, padding side, prompt lengths, greedy / seeded sampling / beam search, the
cache kind (transformers' dynamic or static cache, which a quantized model packs) and presets.
One compiled model per preset serves every example, as in a long-running server: the graphs
compiled for earlier examples (other shapes) are reused, never the float model. CI runs a few
examples; ``make fuzz`` many more (``QUAROT_FUZZ_EXAMPLES``).
"""

import os

import torch
from generation_driver import drive, generation_kwargs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model, token_ids
from transformers.cache_utils import StaticCache

import quarot_fx

EXAMPLES = max(1, int(os.environ.get("QUAROT_FUZZ_EXAMPLES", "12")) // 3)


@st.composite
def generation_settings(draw):
    mode = draw(st.sampled_from(["greedy", "sample", "beams"]))
    return dict(
        preset=draw(st.sampled_from(["fp", "w4a4kv4"])),
        batch=draw(st.integers(1, 4)),
        length=draw(st.integers(1, 10)),
        padding=draw(st.sampled_from(["left", "right"])),
        mode=mode,
        beams=draw(st.integers(2, 3)) if mode == "beams" else 1,
        cache=draw(st.sampled_from(["dynamic", "static"])) if mode != "beams" else "dynamic",
        steps=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**16)),
    )


def padded(batch, length, side, seed):
    ids = token_ids(batch=batch, length=length, seed=seed)
    mask = torch.ones_like(ids)
    g = torch.Generator().manual_seed(seed)
    for row in range(batch):
        pad = int(torch.randint(0, length, (1,), generator=g)) if batch > 1 else 0
        if pad:
            mask[row, :pad] = 0 if side == "left" else 1
            if side == "right":
                mask[row, length - pad:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(setting=generation_settings())
def test_generate_equals_the_compiled_forward_step_by_step(setting):
    compiled = COMPILED.get(setting["preset"])
    if compiled is None:
        compiled = COMPILED[setting["preset"]] = quarot_fx.compile(MODEL, preset=setting["preset"], lowering="fx")
    ids, mask = padded(setting["batch"], setting["length"], setting["padding"], setting["seed"])
    steps, mode, beams = setting["steps"], setting["mode"], setting["beams"]
    extra = {"cache_implementation": "static"} if setting["cache"] == "static" else {}
    torch.manual_seed(setting["seed"])
    with torch.no_grad():
        out = compiled.generate(ids, attention_mask=mask, **generation_kwargs(steps, mode, beams, **extra))
    cache = (StaticCache(config=MODEL.config, max_cache_len=ids.shape[1] + steps)
             if setting["cache"] == "static" else None)
    torch.manual_seed(setting["seed"])
    expected = drive(compiled, ids, mask, steps, mode, beams, cache=cache)
    assert torch.equal(out[:, ids.shape[1]:], expected), setting


MODEL = tiny_model("llama")
COMPILED: dict = {}  # preset → one compiled model for every example (conftest resets Dynamo per test)
