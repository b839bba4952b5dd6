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
from quarot_fx.passes.weights import WEIGHT_CACHE
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
    assert manifest["format_version"] == 1 and len(manifest["weights"]) == 14
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
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        quarot_fx.load(tmp_path, tiny_model("llama"))
    with pytest.raises(ArtifactError, match="not a quarot-fx artifact"):
        quarot_fx.load(tmp_path / "elsewhere", tiny_model("llama"))


def test_rtn_models_save_and_load_too(tmp_path):
    saved = compiled_and_saved(tmp_path, {"preset": "w4a4kv4", "lowering": "fx"})
    loaded, _ = fresh_load(tmp_path)
    assert torch.equal(loaded, saved)
