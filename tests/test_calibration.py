"""The calibration runner and sequential GPTQ.

``run_calibration`` must show each site the input every calibration window really produces,
and, when a site's weight is replaced (sequential GPTQ), every later site must see inputs
computed with the replacement: both are checked against eager runs of the model.
"""

import pytest
import torch
from tiny_models import tiny_model

import quarot_fx
import quarot_fx.passes.weight_store
from quarot_fx.passes.windows import run_calibration
from quarot_fx.passes.registry import register_pass, unregister_pass

WINDOW = 16


def _calibration(count: int = 2):
    return [torch.randint(0, 128, (1, WINDOW), generator=torch.Generator().manual_seed(i)) for i in range(count)]


def _eager_inputs(model, ids, module_names):
    """Inputs of the named linears when the eager model runs on ``ids``."""
    seen = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: seen.__setitem__(name, args[0].detach().clone())) for name in module_names]
    with torch.no_grad():
        model(ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.fixture
def probe():
    yield
    unregister_pass("probe_calibration")


def test_every_site_sees_each_window_and_a_replaced_weight_reaches_later_sites(probe):
    model = tiny_model("llama")
    calibration = _calibration()
    zeroed = "model.layers.0.self_attn.o_proj"
    watched = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    recorded = {}

    @register_pass("weights", when=lambda config: True)
    def probe_calibration(ctx):
        def visit(site, inputs):
            name = quarot_fx.passes.graph_utils.label(site.node)
            recorded[name] = [x.clone() for x in inputs]
            if name == zeroed:
                return torch.zeros_like(getattr(ctx.gm, site.weight_node.target))
            return None

        assert run_calibration(ctx, ctx.analysis.quantized, visit, "probe") == len(calibration)

    # R3 (query/key, inside attention) is the only rotation: every linear input keeps its basis.
    options = {"preset": "fp", "lowering": "fx", "r1": False, "r2": False, "r3": True, "r4": False,
               "calibration": calibration}
    with torch.no_grad():
        torch.compile(model, backend="quarot", options=options)(calibration[0], use_cache=False)
    assert set(watched) <= set(recorded), sorted(recorded)
    for i, ids in enumerate(calibration):
        plain = _eager_inputs(model, ids, watched)
        torch.testing.assert_close(recorded[watched[0]][i], plain[watched[0]])  # before the replaced site
        assert not torch.allclose(recorded[watched[1]][i], plain[watched[1]], atol=1e-3)
        with torch.no_grad():
            kept = model.get_submodule(zeroed).weight.clone()
            model.get_submodule(zeroed).weight.zero_()
            try:
                changed = _eager_inputs(model, ids, watched)
            finally:
                model.get_submodule(zeroed).weight.copy_(kept)
        for name in watched[1:]:  # after it: computed with the zero weight
            torch.testing.assert_close(recorded[name][i], changed[name], rtol=1e-5, atol=1e-5)


@pytest.fixture
def capture():
    yield
    unregister_pass("capture_gptq_codes")


def test_sequential_gptq_matches_one_pass_at_the_first_site_only(capture):
    codes = {}

    @register_pass("materialize", before="materialize_weights", when=lambda config: True)
    def capture_gptq_codes(ctx):
        for entry in ctx.sites.values():
            logical, _ = ctx.weights.edited(type(entry)(entry.site, edits=entry.edits[:-1]))
            codes[(ctx.config.gptq_sequential, ctx.fqn_of(entry.original_weight))] = entry.edits[-1].codes(logical)[0]

    model = tiny_model("llama")
    calibration = _calibration(4)
    quarot_fx.passes.weight_store.WEIGHT_CACHE.clear()
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        for sequential in (False, True):
            torch._dynamo.reset()
            options = {"w_bits": 4, "a_bits": 16, "kv_bits": 16, "weights": "gptq", "lowering": "fx",
                       "kernels": "fake", "calibration": calibration, "gptq_sequential": sequential}
            torch.compile(model, backend="quarot", options=options)(calibration[0], use_cache=False)
    assert "sequentially" in " ".join(reports[-1].notes) and "in one pass" in " ".join(reports[0].notes)
    names = [name for seq, name in codes if seq]
    first, last = names[0], names[-1]
    assert first.endswith("layers.0.self_attn.q_proj.weight") and last.endswith("layers.1.mlp.down_proj.weight")
    assert torch.equal(codes[(True, first)], codes[(False, first)])  # nothing quantized before it
    assert not torch.equal(codes[(True, last)], codes[(False, last)])  # its inputs came through 4-bit layers
    assert "gptq w4 per channel sequential" in str(reports[-1])
