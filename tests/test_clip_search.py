"""GBS clip search: the bounded binary search, and the pass on a tiny model."""

import pytest
import torch
from tiny_models import tiny_model, token_ids

import quarot_fx
from quarot_fx.passes.clip_search import binary_search

CALIBRATION = [torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(3)]


@pytest.mark.parametrize("minimum", [0.05, 0.37, 0.81])
def test_binary_search_finds_the_minimum_of_a_unimodal_objective(minimum):
    calls = []

    def objective(c):
        calls.append(c)
        return (c - minimum) ** 2

    clip, seen = binary_search(objective, iterations=8)
    assert abs(clip - minimum) <= 1 / 256 + 1e-9
    assert len(calls) == len(seen) <= 2 + 2 * 8  # every point evaluated once


def test_binary_search_keeps_no_clipping_when_clipping_only_hurts():
    clip, _ = binary_search(lambda c: 1 - c, iterations=8)
    assert clip == 1.0


def _compile(model, ids, **options):
    options = {"preset": "w4a4kv4", "lowering": "fx", "calibration": CALIBRATION, **options}
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        out = torch.compile(model, backend="quarot", options=options)(ids, use_cache=False).logits
    return out, reports[0]


def test_gbs_defaults_to_the_local_objective_on_two_windows():
    """The default a user can run: local objective, 2 windows (the loss objective takes hours on SmolLM2)."""
    config = quarot_fx.QuaRotConfig.from_options({"preset": "w4a4kv4", "a_clip": "gbs", "calibration": CALIBRATION})
    assert (config.gbs_objective, config.gbs_windows) == ("local", 2)


@pytest.mark.parametrize("objective", ["local", "loss", "fisher"])
def test_searched_clips_are_what_the_compiled_model_uses(objective):
    torch._dynamo.reset()
    model, ids = tiny_model("llama", layers=1), token_ids(length=32)
    _, report = _compile(model, ids, a_clip="gbs", kv_clip="gbs", gbs_objective=objective, gbs_iterations=4,
                         gbs_windows=len(CALIBRATION))
    assert len(report.clips) == 6  # per layer: qkv input, K, V, o input, gate/up input, down input
    assert all(0 < row.clip <= 1 for row in report.clips)
    by_site = {(r.site, r.what): r.clip for r in report.clips}
    used = {(r.site, r.what): r.clip for r in report.quantized if r.what != "weight"}
    assert used == pytest.approx(by_site)  # the integer ops were lowered with the searched clips
    assert "clips found by GBS" in str(report) and report.counters["gbs_windows"] == len(CALIBRATION)


def test_loss_search_does_not_lose_to_the_default_clips_on_its_own_windows():
    torch._dynamo.reset()
    model = tiny_model("llama", layers=1)
    window = CALIBRATION[0]

    def calibration_loss(**options):
        torch._dynamo.reset()
        out, _ = _compile(model, window, kernels="fake", calibration=[window], gbs_windows=1, **options)
        return torch.nn.functional.cross_entropy(out[0, :-1], window[0, 1:]).item()

    assert calibration_loss(a_clip="gbs", kv_clip="gbs", gbs_objective="loss") <= calibration_loss() + 1e-6


@pytest.mark.parametrize("group", [None, 16])
def test_the_loss_objective_scores_the_model_it_compiles(monkeypatch, group):
    """The last site's loss at its chosen clip is the compiled model's loss on the search window:
    the search scores the 4-bit weights the lowering runs (packed and unpacked as it does)."""
    from quarot_fx.passes import clip_search

    torch._dynamo.reset()
    searches = []
    real = clip_search.binary_search

    def record(objective, iterations, tolerance=1e-3):
        searches.append(real(objective, iterations, tolerance))
        return searches[-1]

    monkeypatch.setattr(clip_search, "binary_search", record)
    window = CALIBRATION[0]
    out, _ = _compile(tiny_model("llama", layers=2), window, kernels="fake", calibration=[window], gbs_windows=1,
                      a_clip="gbs", kv_clip="gbs", gbs_objective="loss", gbs_iterations=3, w_group_size=group)
    clip, seen = searches[-1]
    compiled = torch.nn.functional.cross_entropy(out[0, :-1], window[0, 1:], reduction="sum").item()
    assert seen[clip] == pytest.approx(compiled, rel=1e-4)


def test_fisher_weights_are_the_loss_gradients_of_the_original_model(monkeypatch):
    """Rotation-only with every activation searched: the gradient the Fisher objective weighs a
    site's error by is the original model's loss gradient at that linear's input, rotated by an
    orthogonal R2/R4, so each token's squared norm matches."""
    from quarot_fx.passes import clip_search

    torch._dynamo.reset()
    model = tiny_model("llama", layers=2)
    captured = []

    def capture(*args):
        captured.append(real(*args))
        return captured[-1]

    real = clip_search._squared_loss_gradients
    monkeypatch.setattr(clip_search, "_squared_loss_gradients", capture)
    window = CALIBRATION[0]
    _compile(model, window, w_bits=16, kv_bits=16, a_clip="gbs", gbs_objective="fisher", gbs_windows=1,
             calibration=[window], gbs_iterations=2)
    by_site = {clip_search._site_of(q)[0]: g2 for q, g2 in captured[0][0].items()}

    inputs = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
             for name, module in model.named_modules() if name.endswith(("o_proj", "down_proj"))]
    # the model is frozen: gradients are tracked from its embedding output on
    hooks.append(model.get_input_embeddings().register_forward_hook(lambda m, args, out: out.requires_grad_()))
    with torch.enable_grad():
        logits = model(window, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        grads = torch.autograd.grad(loss, list(inputs.values()))
    for hook in hooks:
        hook.remove()
    assert len(grads) == 4
    for name, grad in zip(inputs, grads):
        torch.testing.assert_close(by_site[name].sum(-1).reshape(-1), grad.square().sum(-1).reshape(-1),
                                   rtol=1e-3, atol=1e-9)


def test_gbs_needs_calibration():
    with pytest.raises(ValueError, match="a_clip='gbs' / kv_clip='gbs' needs calibration"):
        quarot_fx.QuaRotConfig(a_clip="gbs")
    with pytest.raises(ValueError, match=r"a_clip must be None, a number in \(0, 1\] or 'gbs'"):
        quarot_fx.QuaRotConfig(a_clip="search")


def test_token_subsets_estimate_the_local_objective_and_leave_kv_sites_whole():
    torch._dynamo.reset()
    model, ids = tiny_model("llama", layers=1), token_ids(length=32)
    options = dict(a_clip="gbs", kv_clip="gbs", gbs_objective="local", gbs_iterations=4)
    _, full = _compile(model, ids, **options)
    torch._dynamo.reset()
    _, everything = _compile(model, ids, **options, gbs_tokens=32)  # as many as there are: the same search
    torch._dynamo.reset()
    _, subset = _compile(model, ids, **options, gbs_tokens=16)
    clips = lambda report: {(r.site, r.what): r.clip for r in report.clips}  # noqa: E731
    assert clips(everything) == clips(full)
    assert full.counters["gbs_token_subsets"] == everything.counters["gbs_token_subsets"] == 0
    assert subset.counters["gbs_token_subsets"] == 4  # qkv, o, gate/up and down inputs
    kv = {k: v for k, v in clips(full).items() if k[1] in ("key", "value")}
    assert {k: clips(subset)[k] for k in kv} == kv  # K/V errors pass through attention: never subsampled
    # half the tokens: an estimate, so a clip may move, by at most a few of the 4 halving steps
    assert all(abs(clips(subset)[k] - c) <= 0.25 for k, c in clips(full).items())
