"""Learned rotations (``learn_rotations``): orthogonal, exact when nothing is quantized, better
than their Hadamard start on the quantized loss, saved and restored without learning again."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_rotation_invariance import outlier_model, rel_err
from tiny_models import token_ids

import quarot_fx
from quarot_fx.artifact import compiled_artifacts, read_calibrated
from quarot_fx.calibrated import ArtifactError, Calibrated
from quarot_fx.directories import sha256
from quarot_fx.numerics.rotations import rotation_matrix
from quarot_fx.numerics.stiefel import cayley_step, orthogonality_error

CALIBRATION = [token_ids(length=48, seed=s) for s in range(4)]
LEARN = {"preset": "w4a4kv4", "kernels": "fake", "lowering": "fx", "learn_rotations": True, "learn_steps": 6,
         "learn_lr": 1.5, "learn_windows": 4, "calibration": CALIBRATION}


def compiled(model, ids, **options):
    torch._dynamo.reset()
    runner = quarot_fx.compile(model, **options)
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        out = runner(ids, use_cache=False).logits
    return runner, out, reports[0]


def learned_matrices(runner) -> dict:
    _, _, artifacts = compiled_artifacts(runner, "test", ValueError)
    return artifacts[0].calibrated.rotations


def test_cayley_step_stays_orthogonal_and_descends():
    torch.manual_seed(0)
    target = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    r = torch.eye(16, dtype=torch.float64)
    loss = lambda m: (m - target).square().sum()  # noqa: E731
    before = loss(r).item()
    for _ in range(20):
        r = cayley_step(r, 2 * (r - target), 0.1)
        assert orthogonality_error(r) <= 1e-5  # the fixed-point iterations drift; QR past 1e-5
    assert loss(r).item() < 0.5 * before


ARCHS = st.sampled_from([("llama", 64, 4, 2), ("qwen2", 64, 4, 1), ("gpt2", 48, 4, 4), ("opt", 64, 4, 4),
                         ("phi3", 64, 4, 2), ("gemma", 48, 2, 1), ("mistral", 64, 4, 4)])


@settings(max_examples=7, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch_sizes=ARCHS, layers=st.integers(1, 2), rotation=st.sampled_from(["hadamard", "randomized_hadamard"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 3))
def test_learned_rotations_fold_exactly(arch_sizes, layers, rotation, dtype, seed):
    """Matrices learned on the quantized network, folded into a rotation-only compile: equal to eager."""
    arch, hidden, heads, kv_heads = arch_sizes
    model = outlier_model(arch, seed=seed, hidden=hidden, heads=heads, kv_heads=kv_heads, layers=layers, ffn=96)
    ids = token_ids(length=11, seed=seed)
    runner, _, report = compiled(model, ids, **LEARN, rotation=rotation, seed=seed)
    matrices = learned_matrices(runner)
    assert sorted(name.split()[0] for name in matrices) == ["R1"] + ["R2"] * layers, str(report)
    for name, r in matrices.items():
        assert orthogonality_error(r) <= 1e-5, name
    r1 = next(m for n, m in matrices.items() if n.startswith("R1"))
    start = rotation_matrix(rotation, r1.shape[0], seed=seed, dtype=torch.float64)
    assert (r1 - start).abs().max().item() > 1e-3, "learning did not move R1 from its initialisation"
    model = model.to(dtype)
    exact = {"preset": "fp", "lowering": "fx", "rotation": rotation, "seed": seed, "learn_rotations": True,
             "calibrated": Calibrated(rotations=matrices)}
    _, out, report = compiled(model, ids, **exact)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    assert rel_err(out, ref) <= (1e-4 if dtype == torch.float32 else 1e-6)
    assert "learned R1" in str(report.linears) or "learned" in str(report)


def quantized_loss(runner, windows) -> float:
    total = 0.0
    with torch.no_grad():
        for ids in windows:
            logits = runner(ids, use_cache=False).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:]).item()
    return total / len(windows)


def test_the_learning_objective_is_the_quantized_models_loss():
    """What learning minimises is the loss of the network it is for: at its (barely moved) start,
    the mean loss it reports equals the Hadamard-rotated quantized model's on the same windows.
    (Learning without the weights' clip search once fitted a network 1.4 nats worse.)"""
    model = outlier_model("llama", hidden=64, heads=4, kv_heads=2, layers=2, ffn=128)
    base = {k: v for k, v in LEARN.items() if not k.startswith("learn")}
    hadamard, _, _ = compiled(model, CALIBRATION[0], **base, quantize_lm_head=False)
    expected = quantized_loss(hadamard, CALIBRATION)
    steps = {"learn_steps": len(CALIBRATION), "learn_lr": 1e-9}
    _, _, report = compiled(model, CALIBRATION[0], **{**LEARN, **steps}, quantize_lm_head=False)
    note = next(n for n in report.notes if "Cayley SGD steps" in n)
    assert f"{len(CALIBRATION)} calibration windows of {CALIBRATION[0].shape[1]} tokens" in note, note
    reported = float(re.search(r"quantized loss ([0-9.]+) →", note).group(1))
    assert abs(reported - expected) < 2e-3, (reported, expected)


def test_every_graph_of_a_model_folds_the_same_learned_matrices():
    """Prefill and decode graphs (and recompiles) learn once: the KV cache keeps one basis."""
    model = outlier_model("llama", hidden=64, heads=4, kv_heads=2, layers=1, ffn=128)
    torch._dynamo.reset()
    runner = quarot_fx.compile(model, **LEARN)
    with quarot_fx.collect_reports() as reports:
        with torch.no_grad():
            runner(token_ids(length=16), use_cache=False)  # learns
            runner.generate(token_ids(length=10), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(reports) >= 3
    assert sum("Cayley SGD steps" in n for r in reports for n in r.notes) == 1
    assert all(any("learned rotations" in n for n in r.notes) for r in reports)
    matrices = [r.linears for r in reports]
    assert all(str(m) == str(matrices[0]) for m in matrices[1:])  # same learned edits everywhere


def test_a_model_whose_first_graph_cannot_learn_keeps_hadamard_everywhere():
    """generate() first: its graphs return the last position's logits only, so nothing learns,
    and every graph says so (none may fold other matrices than its siblings)."""
    model = outlier_model("llama", hidden=64, heads=4, kv_heads=2, layers=1, ffn=128)
    torch._dynamo.reset()
    runner = quarot_fx.compile(model, **LEARN)
    with quarot_fx.collect_reports() as reports, torch.no_grad():
        runner.generate(token_ids(length=10), max_new_tokens=3, do_sample=False, pad_token_id=0)
        runner(token_ids(length=16), use_cache=False)
    assert len(reports) >= 2
    assert all(any(s.what == "learned rotations" for s in r.skipped) for r in reports)


def test_saved_learned_rotations_load_without_learning(tmp_path):
    model = outlier_model("llama", hidden=64, heads=4, kv_heads=2, layers=1, ffn=128)
    ids = token_ids(length=12)
    runner, out, _ = compiled(model, ids, **{**LEARN, "kernels": "integer"})
    quarot_fx.save(runner, tmp_path / "learned")
    torch._dynamo.reset()
    loaded = quarot_fx.load(tmp_path / "learned", model)
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        again = loaded(ids, use_cache=False).logits
    assert torch.equal(again, out)
    assert any("restored from a saved artifact" in n for n in reports[0].notes)
    assert not any("Cayley SGD steps" in n for n in reports[0].notes)


def test_gptq_quantizes_the_learned_weights():
    model = outlier_model("qwen2", hidden=64, heads=4, kv_heads=1, layers=1, ffn=128)
    ids = token_ids(length=12)
    runner, out, report = compiled(model, ids, **{**LEARN, "weights": "gptq"})
    assert torch.isfinite(out).all()
    assert any("learned" in edit for linear in report.linears for edit in linear.offline), str(report)
    assert any(q.method.startswith("gptq") for q in report.quantized if q.what == "weight")


@pytest.mark.parametrize("options, named", [
    ({"learn_rotations": True}, "calibration"),
    ({"learn_rotations": True, "calibration": CALIBRATION, "rotation": "none"}, "rotation"),
    ({"learn_rotations": True, "calibration": CALIBRATION, "weights": "gptq", "gptq_sequential": False},
     "gptq_sequential"),
    ({"learn_steps": -1}, "learn_steps"), ({"learn_lr": 0}, "learn_lr"), ({"learn_windows": 0}, "learn_windows"),
    ({"learn_tokens": 1}, "learn_tokens"), ({"learn_rotations": "yes"}, "learn_rotations"),
])
def test_bad_learning_options_are_refused_by_name(options, named):
    with pytest.raises(ValueError, match=named):
        quarot_fx.QuaRotConfig.from_options({"preset": "w4a4kv4", **options})


def test_a_non_orthogonal_saved_rotation_is_refused(tmp_path):
    """Even with the file's hash rewritten to match (a forger), the matrix itself is checked."""
    model = outlier_model("llama", hidden=64, heads=4, kv_heads=2, layers=1, ffn=128)
    runner, _, _ = compiled(model, token_ids(length=12), **LEARN)
    path = quarot_fx.save(runner, tmp_path / "learned")
    tensors = load_file(str(path / "calibrated.safetensors"))
    name = next(k for k in tensors if k.startswith("rotation/R1"))
    tensors[name] = tensors[name] * 1.01
    manifest = json.loads((path / "manifest.json").read_text())
    with safe_open(str(path / "calibrated.safetensors"), "pt") as f:
        kept = f.metadata()
    save_file(tensors, str(path / "calibrated.safetensors"), metadata=kept)
    manifest["files"]["calibrated.safetensors"] = sha256(path / "calibrated.safetensors")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not an orthogonal matrix"):
        read_calibrated(path)
