"""SmoothRot: exact channel scaling of the down-projection input, found from the graph."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import ARCHITECTURES, tiny_model, token_ids

import quarot_fx

GATED = ("llama", "mistral", "qwen2", "phi3", "gemma")  # down(act(gate) * up); opt and gpt2 are not
CALIBRATION = [torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def run(model, ids, **options):
    options = {"preset": "fp", "lowering": "fx", "smoothrot": True, "calibration": CALIBRATION, **options}
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        out = torch.compile(model, backend="quarot", options=options)(ids, use_cache=False).logits
    return out, reports[0]


@settings(max_examples=10, deadline=None)
@given(arch=st.sampled_from(ARCHITECTURES), alpha=st.sampled_from([0.0, 0.5, 0.85, 1.0]),
       rotation=st.sampled_from(["hadamard", "none"]), outlier=st.booleans())
def test_smoothrot_keeps_the_function(arch, alpha, rotation, outlier):
    torch._dynamo.reset()
    model, ids = tiny_model(arch), token_ids()
    if outlier:  # a massive activation channel at every down-projection input
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("up_proj.weight", "gate_up_proj.weight", "fc1.weight", "c_fc.weight")):
                    param.view(-1, param.shape[-1])[0] *= 40.0
    out, report = run(model, ids, smoothrot_alpha=alpha, rotation=rotation)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    smoothed = report.region_counts().get("SmoothRot", 0)
    if arch in GATED:
        assert smoothed == 2 and report.counters["smoothed_channels"] == 2 * 128
    else:
        assert smoothed == 0
        assert sum(s.what.startswith("SmoothRot") for s in report.skipped) == 2  # with the reason


def test_smoothing_flattens_the_down_projection_input():
    model, ids = tiny_model("llama"), token_ids()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[5] *= 100.0  # channel 5 of the down input carries outliers
    _, report = run(model, ids, rotation="none")
    region = next(r for r in report.regions if r.kind == "SmoothRot" and "layers.0" in r.where)
    before, after = (float(v) for v in region.where.split("input max ")[1].split(" after")[0].split(" → "))
    assert after < before / 5


def test_smoothrot_needs_calibration_and_a_valid_alpha():
    with pytest.raises(ValueError, match="smoothrot=True needs calibration"):
        quarot_fx.QuaRotConfig(smoothrot=True)
    with pytest.raises(ValueError, match=r"smoothrot_alpha must be a number in \[0, 1\]"):
        quarot_fx.QuaRotConfig(smoothrot_alpha=1.5)


def test_report_table_of_channel_maxima_before_and_after_smoothing_and_rotation():
    from quarot_fx.numerics.hadamard import hadamard_matrix

    model, ids = tiny_model("llama"), token_ids()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[5] *= 100.0
    _, report = run(model, ids, rotation="hadamard")
    row = next(r for r in report.channel_max if r.site == "model.layers.0.mlp.down_proj")
    seen = {}
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
    window = torch.cat([t.reshape(-1) for t in CALIBRATION])[:ids.numel()].reshape(ids.shape)  # window 1
    with torch.no_grad():
        model(window, use_cache=False)
    hook.remove()
    x = seen["x"].double().reshape(-1, 128)
    h = hadamard_matrix(128, torch.float64) / 128 ** 0.5
    assert row.before == pytest.approx(x.abs().max().item(), rel=1e-5)
    assert row.rotated == pytest.approx((x @ h).abs().max().item(), rel=1e-5)
    assert row.smoothed < row.before / 5 and row.smoothed_rotated < row.rotated
    assert "max |x| over channels" in str(report) and len(report.channel_max) == 2


def test_a_sweep_of_alpha_calibrates_once_and_a_changed_weight_calibrates_again():
    model, ids = tiny_model("llama"), token_ids()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    counts = []
    for alpha, touch in ((0.3, False), (0.6, False), (0.6, True)):
        torch._dynamo.reset()
        if touch:
            with torch.no_grad():
                model.model.layers[0].mlp.gate_proj.weight.mul_(1.5)
                ref = model(ids, use_cache=False).logits
        out, report = run(model, ids, smoothrot_alpha=alpha)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        counts.append(report.counters["smoothrot_calibration_chunks"])
    assert counts[0] > 0 and counts[1] == 0 and counts[2] > 0
