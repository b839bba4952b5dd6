"""Dimension expansion: a residual stream zero-padded to a width with a Hadamard matrix is exact.

Widths 92 = 4·23 and 116 = 4·29 have no constructible Hadamard order here, so R1 expands them
automatically; ``expand=k`` adds k dimensions (rounded up to the next order) to any width. The
padded coordinates carry signal after R1, so every norm must divide by the original width.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model, token_ids

import quarot_fx
from quarot_fx.numerics.hadamard import is_hadamard_order, next_hadamard_order


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ["llama", "gemma", "opt", "gpt2", "phi3"])  # RMSNorm, (1 + w), LayerNorm, Conv1D, fused
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hidden=st.sampled_from([92, 116, 64]),
       expand=st.sampled_from([0, 8, 40]), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_expanded_residual_computes_the_same_function(arch, hidden, expand, dtype):
    torch._dynamo.reset()
    model, ids = tiny_model(arch, hidden=hidden, heads=2, kv_heads=2 if arch in ("gpt2", "opt") else 1).to(dtype), \
        token_ids()
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        out = torch.compile(model, backend="quarot", options={"preset": "fp", "lowering": "fx", "expand": expand})(
            ids, use_cache=False).logits
        ref = model(ids, use_cache=False).logits
    assert rel_err(out, ref) <= (1e-4 if dtype == torch.float32 else 1e-6)
    report = reports[0]
    (r1,) = [r for r in report.regions if r.kind == "R1"]
    width = next_hadamard_order(hidden + expand)
    assert r1.size == width and is_hadamard_order(width)
    assert report.counters["expanded_dims"] == width - hidden
    if width != hidden:
        assert f"expanded {hidden} → {width}" in r1.where


def test_expansion_with_quantization_and_hidden_states_output():
    model, ids = tiny_model("llama", hidden=92, heads=2, kv_heads=1), token_ids()
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        out = torch.compile(model, backend="quarot", options={"preset": "w8a8kv8", "lowering": "fx"})(
            ids, use_cache=False, output_hidden_states=True)
        ref = model(ids, use_cache=False, output_hidden_states=True)
    assert rel_err(out.logits, ref.logits) < 0.05
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):  # explicit inverses cut back to 92
        assert mine.shape == theirs.shape
        assert rel_err(mine, theirs) < 0.05
    assert reports[0].counters["expanded_dims"] == next_hadamard_order(92) - 92
