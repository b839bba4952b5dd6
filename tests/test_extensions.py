"""Extension points, used from outside the package as a researcher would.

Each test body between the ``# --- begin/end`` markers is the whole extension; the closing
note of issue 12 quotes their line counts (`test_extension_sizes` keeps them honest).
"""

import inspect

import pytest
import torch
from tiny_models import tiny_model, token_ids

import quarot_fx
from quarot_fx.passes.registry import unregister_pass
from quarot_fx.numerics.rotations import ROTATION_KINDS


@pytest.fixture
def qr_kind():
    yield
    ROTATION_KINDS.pop("qr", None)


def test_a_new_rotation_kind_in_a_few_lines(qr_kind):
    # --- begin rotation kind
    def qr_rotation(n, seed=0, group=None):
        """A seeded Haar-random orthogonal matrix from the QR decomposition of a Gaussian."""
        gauss = torch.randn(n, n, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
        q, r = torch.linalg.qr(gauss)
        return q * torch.sign(torch.diagonal(r))

    quarot_fx.register_rotation("qr", qr_rotation)
    options = {"preset": "fp", "r3": True, "lowering": "fx", "rotation": "qr",
               "r2_rotation": "qr", "r3_rotation": "qr", "r4_rotation": "qr"}
    # --- end rotation kind
    model, ids = tiny_model("llama"), token_ids()
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        out = torch.compile(model, backend="quarot", options=options)(ids, use_cache=False).logits
        ref = model(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    report = reports[0]
    assert report.region_counts() == {"R1": 1, "R2": 2, "R3": 2, "R4": 2}
    assert all("qr" in region.rotation for region in report.regions), str(report)
    assert "qr" in quarot_fx.rotation_kinds()


@pytest.fixture
def float_layer_pass():
    yield
    unregister_pass("keep_first_down_projection_in_float")


def test_a_new_pass_in_a_few_lines(float_layer_pass):
    # --- begin pass
    from quarot_fx.passes.registry import register_pass

    @register_pass("weights", before="quantize_weights", when=lambda config: config.w_bits < 16)
    def keep_first_down_projection_in_float(ctx):
        """Mixed precision: layer 0's down-projection keeps float weights and inputs."""
        ctx.analysis.quantized = [site for site in ctx.analysis.quantized
                                  if ctx.fqn_of(site.weight_node.target) != "model.layers.0.mlp.down_proj.weight"]
    # --- end pass
    model, ids = tiny_model("llama"), token_ids()
    explanation = quarot_fx.explain(model, ids, model_kwargs={"use_cache": False}, preset="w4a4kv4")
    report = explanation.reports[0]
    assert report.pipeline.index("keep_first_down_projection_in_float") == report.pipeline.index("quantize_weights") - 1
    assert "keep_first_down_projection_in_float" in str(explanation)
    down = {e.weight: e for e in report.linears if "down_proj" in e.weight}
    assert not any("rtn" in t for t in down["model.layers.0.mlp.down_proj.weight"].offline)
    assert any("rtn" in t for t in down["model.layers.1.mlp.down_proj.weight"].offline)


def test_a_pass_must_name_a_known_anchor():
    from quarot_fx.passes.registry import register_pass

    with pytest.raises(ValueError, match="no registered pass named 'nope'"):
        register_pass("weights", after="nope")(lambda ctx: None)
    with pytest.raises(ValueError, match="stage must be one of 'analysis'"):
        register_pass("later")(lambda ctx: None)


def test_unregistered_kinds_are_refused_by_name():
    with pytest.raises(ValueError, match="r4_rotation must be one of 'hadamard'"):
        quarot_fx.QuaRotConfig(r4_rotation="qr-not-registered")


@pytest.fixture
def plain_methods():
    yield
    from quarot_fx.numerics.weight_methods import unregister_weight_method

    for name in ("plain-rtn", "diag-rtn"):
        unregister_weight_method(name)


def test_a_new_weight_method_in_a_few_lines(plain_methods):
    # --- begin weight method
    def plain_rtn(w, hessian, keep, s):
        """Round to nearest with one scale per output row (max |w| / (2^(b-1) - 1)), no clip search."""
        top = 2 ** (s.bits - 1) - 1
        scales = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / top
        return torch.clamp(torch.round(w / scales), -top - 1, top).to(torch.int8), scales

    def diag_rtn(w, hessian, keep, s):
        """The same, but it asks for calibration: the Hessian of its input arrives."""
        assert hessian is not None and hessian.shape == (w.shape[1], w.shape[1])
        return plain_rtn(w, hessian, keep, s)

    quarot_fx.register_weight_method("plain-rtn", plain_rtn, needs_calibration=False)
    quarot_fx.register_weight_method("diag-rtn", diag_rtn, needs_calibration=True)
    # --- end weight method
    model, ids = tiny_model("llama"), token_ids()
    logits = {}
    for name, options in (("ours", {"weights": "plain-rtn"}), ("rtn", {"weights": "rtn", "w_clip_search": False}),
                          ("calibrated", {"weights": "diag-rtn", "calibration": [token_ids(length=32)]})):
        torch._dynamo.reset()
        with torch.no_grad(), quarot_fx.collect_reports() as reports:
            logits[name] = quarot_fx.compile(model, preset="w4a4kv4", lowering="fx", **options)(ids).logits
        assert any(options["weights"] in t for e in reports[0].linears for t in e.offline), str(reports[0])
    assert torch.equal(logits["ours"], logits["rtn"])  # the built-in RTN without clip search, to the bit
    assert torch.equal(logits["calibrated"], logits["rtn"])
    assert "plain-rtn" in quarot_fx.weight_methods()
    with pytest.raises(ValueError, match="weights='diag-rtn' needs calibration"):
        quarot_fx.QuaRotConfig(weights="diag-rtn")
    with pytest.raises(ValueError, match="gptq_act_order=True works with dense GPTQ only"):
        quarot_fx.QuaRotConfig(weights="diag-rtn", gptq_act_order=True, calibration=[token_ids(length=32)])


@pytest.fixture
def int64_gemm():
    yield
    from quarot_fx.kernels.gemm import unregister_gemm

    unregister_gemm("int64")


def test_a_new_gemm_candidate_in_a_few_lines(int64_gemm, monkeypatch):
    # --- begin gemm candidate
    from quarot_fx.kernels.gemm import register_gemm

    def int64_sums(a, w, group, out, dtype):
        """Exact sums in int64: [rows, out] for one group (into ``out`` when given), else [groups, rows, out]."""
        sums = torch.einsum("mgk,ngk->gmn", a.long().reshape(a.shape[0], -1, group), w.reshape(w.shape[0], -1, group))
        if sums.shape[0] > 1:
            return sums.to(dtype)
        return out.copy_(sums[0]) if out is not None else sums[0].to(dtype)

    register_gemm("int64", lambda rows, k, n, group, dense: True,
                  prepare=lambda codes, group, dtype: codes.long(), matmul=int64_sums)
    # --- end gemm candidate
    from quarot_fx.kernels import int_gemm

    model, ids = tiny_model("llama"), token_ids()
    logits = {}
    for policy in ("int64", "float"):
        torch._dynamo.reset()
        with torch.no_grad(), quarot_fx.collect_reports() as reports:
            logits[policy] = quarot_fx.compile(model, preset="w4a4kv4", lowering="fx", int_gemm=policy)(ids).logits
        assert {d.choice for d in reports[0].gemm} == {policy}
    assert torch.equal(logits["int64"], logits["float"])  # the same exact sums, the same bits
    asked = []
    monkeypatch.setattr(int_gemm, "measure", lambda *shape, **_: asked.append(shape[-1]) or {c: 1.0 for c in shape[-1]})
    int_gemm.forget()
    int_gemm.decide(4, 64, 32, 64)
    assert "int64" in asked[0]  # "auto" times it with the others


def extension_lines(test) -> int:
    source = inspect.getsource(test).splitlines()
    begin = next(i for i, line in enumerate(source) if "# --- begin" in line)
    end = next(i for i, line in enumerate(source) if "# --- end" in line)
    return sum(1 for line in source[begin + 1:end] if line.strip())


def test_extension_sizes():
    assert extension_lines(test_a_new_rotation_kind_in_a_few_lines) < 30
    assert extension_lines(test_a_new_pass_in_a_few_lines) < 50
    assert extension_lines(test_a_new_weight_method_in_a_few_lines) < 40
    assert extension_lines(test_a_new_gemm_candidate_in_a_few_lines) < 40
