"""quarot_fx.save / load: what calibration produced, written once and loaded without calibrating."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quarot_fx
from quarot_fx.artifact import ArtifactError
from quarot_fx.passes.weight_store import WEIGHT_CACHE
from tiny_models import tiny_model, token_ids

CALIBRATED = {"preset": "w4a4kv4", "weights": "gptq", "smoothrot": True, "a_clip": "gbs", "kv_clip": "gbs",
              "gbs_objective": "local", "gbs_iterations": 3, "lowering": "fx"}


def calibration():
    return [token_ids(length=48, seed=s) for s in range(2)]


def compiled_and_saved(tmp_path, options, arch="llama"):
    torch._dynamo.reset()
    model = tiny_model(arch)
    compiled = quarot_fx.compile(model, **options, calibration=calibration())
    logits = compiled(token_ids()).logits
    quarot_fx.save(compiled, tmp_path)
    return logits


def fresh_load(path, arch="llama", **overrides):
    torch._dynamo.reset()
    WEIGHT_CACHE.clear()  # nothing left over from the compile that calibrated
    loaded = quarot_fx.load(path, tiny_model(arch), **overrides)
    with quarot_fx.collect_reports() as reports:
        logits = loaded(token_ids()).logits
    return logits, reports[0]


@pytest.mark.parametrize("options", [CALIBRATED, {"preset": "w4a4kv4", "weights": "obr", "sparsity_pattern": "2:4",
                                                  "lowering": "fx"}])
def test_loaded_model_equals_the_saved_one_bit_for_bit_without_calibrating(tmp_path, options):
    saved = compiled_and_saved(tmp_path, options)
    loaded, report = fresh_load(tmp_path)
    assert torch.equal(loaded, saved)
    for counter in ("gptq_calibration_chunks", "smoothrot_calibration_chunks", "gbs_windows"):
        assert report.counters[counter] == 0  # nothing was calibrated or searched again
    assert any("restored from a saved artifact" in note for note in report.notes)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and len(manifest["weights"]) == 14
    assert "calibration" not in manifest["options"]


def test_an_artifact_loads_in_a_fresh_process(tmp_path):
    saved = compiled_and_saved(tmp_path, CALIBRATED)
    torch.save(saved, tmp_path / "expected.pt")
    script = (f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); import quarot_fx; "
              "from tiny_models import tiny_model, token_ids; "
              f"y = quarot_fx.load({str(tmp_path)!r}, tiny_model('llama'))(token_ids()).logits; "
              f"print(torch.equal(y, torch.load({str(tmp_path / 'expected.pt')!r})))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.stdout.strip().splitlines()[-1] == "True", done.stderr[-2000:]


def test_what_cannot_load_says_why(tmp_path):
    torch._dynamo.reset()
    never_called = quarot_fx.compile(tiny_model("llama"), preset="w4a4kv4")
    with pytest.raises(ArtifactError, match="call it once"):
        quarot_fx.save(never_called, tmp_path / "none")
    compiled_and_saved(tmp_path, {"preset": "w4a4kv4", "weights": "gptq", "lowering": "fx"})
    with pytest.raises(ArtifactError, match="values of .* differ"):
        quarot_fx.load(tmp_path, tiny_model("llama", seed=1))
    with pytest.raises(ArtifactError, match="parameters missing"):
        quarot_fx.load(tmp_path, tiny_model("qwen2"))
    with pytest.raises(ArtifactError, match="would change the saved model"):
        quarot_fx.load(tmp_path, tiny_model("llama"), w_bits=8)
    with pytest.raises(ArtifactError, match="pass model="):
        quarot_fx.load(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99"):
        quarot_fx.load(tmp_path, tiny_model("llama"))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    tensors = (tmp_path / "calibrated.safetensors").read_bytes()
    (tmp_path / "calibrated.safetensors").write_bytes(tensors[: len(tensors) // 2])
    with pytest.raises(ArtifactError, match="replaced, edited or truncated"):
        quarot_fx.load(tmp_path, tiny_model("llama"))
    with pytest.raises(ArtifactError, match="not a quarot-fx artifact"):
        quarot_fx.load(tmp_path / "elsewhere", tiny_model("llama"))


def test_rtn_models_save_and_load_too(tmp_path):
    saved = compiled_and_saved(tmp_path, {"preset": "w4a4kv4", "lowering": "fx"})
    loaded, _ = fresh_load(tmp_path)
    assert torch.equal(loaded, saved)


# Issue 29, row 3: artifacts that cannot lie -------------------------------------------------------

GPTQ = {"preset": "w4a4kv4", "weights": "gptq", "lowering": "fx"}


def edit_manifest(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def forge(path, **options):
    """Rewrite the options everywhere they are kept, the tensors file's metadata and its sha256
    included: only the codes themselves can then tell."""
    from safetensors.torch import load_file, save_file

    from quarot_fx.directories import sha256
    from safetensors import safe_open

    with safe_open(str(path / "calibrated.safetensors"), "pt") as f:
        metadata = f.metadata()
    metadata["options"] = json.dumps({**json.loads(metadata["options"]), **options}, sort_keys=True)
    save_file(load_file(str(path / "calibrated.safetensors")), str(path / "calibrated.safetensors"), metadata=metadata)
    edit_manifest(path, lambda m: (m["options"].update(options),
                                   m["files"].update({"calibrated.safetensors": sha256(path / "calibrated.safetensors")})))


def test_an_interrupted_save_leaves_the_old_artifact(tmp_path, monkeypatch):
    old = compiled_and_saved(tmp_path / "a", GPTQ)
    torch._dynamo.reset()
    other = quarot_fx.compile(tiny_model("llama", seed=3), **GPTQ, calibration=calibration())
    other(token_ids())
    import safetensors.torch

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quarot_fx.save(other, tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no scratch directory left behind
    loaded, _ = fresh_load(tmp_path / "a")
    assert torch.equal(loaded, old)


def test_tampered_artifacts_are_refused_by_name(tmp_path):
    compiled_and_saved(tmp_path / "a", GPTQ)
    compiled_and_saved(tmp_path / "b", {**GPTQ, "seed": 5})
    model = tiny_model("llama")
    (tmp_path / "a" / "calibrated.safetensors").write_bytes((tmp_path / "b" / "calibrated.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match="not the file this artifact was saved with"):
        quarot_fx.load(tmp_path / "a", model)
    compiled_and_saved(tmp_path / "a", GPTQ)  # a save replaces an earlier artifact
    for field, value in (("rotation", "random"), ("w_bits", 3), ("w_group_size", 16), ("seed", 9)):
        original = json.loads((tmp_path / "a" / "manifest.json").read_text())
        edit_manifest(tmp_path / "a", lambda m: m["options"].update({field: value}))
        with pytest.raises(ArtifactError, match=f"option '{field}'"):
            quarot_fx.load(tmp_path / "a", model)
        (tmp_path / "a" / "manifest.json").write_text(json.dumps(original))
    for field, value, what in (("w_bits", 8, "w_bits"), ("w_bits", 3, "w_bits"), ("w_group_size", 16, "w_group_size"),
                               ("sparsity", 0.5, "sparsity")):
        compiled_and_saved(tmp_path / "a", GPTQ)
        forge(tmp_path / "a", **{field: value})
        with pytest.raises(ArtifactError, match=f"option '{what}'"):
            quarot_fx.load(tmp_path / "a", model)
    compiled_and_saved(tmp_path / "a", GPTQ)
    original = json.loads((tmp_path / "a" / "manifest.json").read_text())
    for change, message in ((lambda m: m.pop("model"), "no 'model' field"),
                            (lambda m: m.update(options=["w4a4kv4"]), "'options' must be a dict"),
                            (lambda m: m.pop("files"), "no 'files' field")):
        edit_manifest(tmp_path / "a", change)
        with pytest.raises(ArtifactError, match=message):
            quarot_fx.load(tmp_path / "a", model)
        (tmp_path / "a" / "manifest.json").write_text(json.dumps(original))
    assert torch.equal(fresh_load(tmp_path / "a")[0], fresh_load(tmp_path / "a")[0])  # untouched, it loads


def test_save_refuses_a_directory_that_holds_something_else(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no quarot-fx artifact"):
        compiled_and_saved(tmp_path / "mine", GPTQ)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_failed_compile_leaves_no_half_built_graph_for_save(tmp_path):
    """A pass that raises must not leave a graph without builds where save looks (the traceback
    pytest keeps holds it alive): a later save in the same process would fail on it."""
    from quarot_fx.backend import live_graphs
    from quarot_fx.passes.registry import register_pass, unregister_pass

    @register_pass("weights", when=lambda config: True)
    def broken_pass(ctx):
        raise RuntimeError("broken pass")

    torch._dynamo.reset()
    try:
        with pytest.raises(Exception, match="broken pass") as failed, torch.no_grad():
            torch.compile(tiny_model("llama"), backend="quarot", options={"preset": "w4a4kv4", "lowering": "fx"})(
                token_ids(), use_cache=False)
    finally:
        unregister_pass("broken_pass")
    assert failed.value is not None and all(hasattr(g, "builds") for g in live_graphs())
    torch._dynamo.reset()
    compiled = torch.compile(tiny_model("llama"), backend="quarot", options={"preset": "w4a4kv4", "lowering": "fx"})
    with torch.no_grad():
        compiled(token_ids(), use_cache=False)
    assert (quarot_fx.save(compiled, tmp_path / "q") / "manifest.json").is_file()
