"""The quarot-fx verbs on a tiny local model directory: quantize → DIR → eval / generate, explain."""

from __future__ import annotations

import json

import pytest
import torch

from quarot_fx.cli import main
from tiny_models import tiny_model

WORDS = [f"w{i}" for i in range(120)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved like a Hugging Face checkpoint, with a word-level tokenizer of 128 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    tiny_model("llama").save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    for name in ("calib.txt", "eval.txt"):
        (folder / name).write_text(" ".join(WORDS[i] for i in torch.randint(0, 120, (3000,), generator=g).tolist()))
    return folder


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_quantize_save_eval_and_generate_from_the_saved_directory(model_dir, tmp_path, capsys):
    torch._dynamo.reset()
    status, out, _ = run(capsys, "quantize", model_dir, "--preset", "w4a4kv4", "--weights", "gptq", "--calib",
                         model_dir / "calib.txt", "--calib-windows", 4, "--window", 64, "--option", "lowering=\"fx\"",
                         "-o", tmp_path / "q", "--json")
    assert status == 0 and json.loads(out)["saved"] == str(tmp_path / "q")
    status, out, _ = run(capsys, "eval", tmp_path / "q", "--text", model_dir / "eval.txt", "--windows", 2,
                         "--window", 64, "--json")
    quantized = json.loads(out)
    status, out, _ = run(capsys, "eval", model_dir, "--text", model_dir / "eval.txt", "--windows", 2, "--window", 64,
                         "--json")
    float_ = json.loads(out)
    assert quantized["windows"] == float_["windows"] == 2  # random weights: both near the uniform 131
    assert 50 < quantized["ppl"] < 400 and 50 < float_["ppl"] < 400 and "saved w4a4kv4" in quantized["model"]
    status, out, _ = run(capsys, "generate", tmp_path / "q", "--prompt", "w1 w2 w3", "--steps", 3)
    assert status == 0 and len(out.split()) >= 1


def test_explain_and_the_errors_that_name_the_argument(model_dir, tmp_path, capsys):
    torch._dynamo.reset()
    status, out, _ = run(capsys, "explain", model_dir, "--preset", "w4a4kv4")
    assert status == 0 and "R1" in out and "quarot-fx report" in out
    status, _, err = run(capsys, "quantize", model_dir, "--preset", "w4a4kv4", "--weights", "gptq", "-o", tmp_path / "x")
    assert status == 2 and "pass --calib FILE" in err
    status, _, err = run(capsys, "quantize", model_dir, "--option", "w_bits=3x", "-o", tmp_path / "x")
    assert status == 2 and "w_bits must be" in err
    status, _, err = run(capsys, "eval", model_dir, "--text", model_dir / "calib.txt", "--window", 100000)
    assert status == 2 and "fewer than 100000 tokens" in err
    with pytest.raises(SystemExit):
        main(["quantize", "nowhere", "-o", str(tmp_path / "x")])
    assert "neither 'tiny', 'smollm2-135m' nor a local model directory" in capsys.readouterr().err


def test_outlier_picture_and_its_numbers(model_dir, tmp_path, capsys):
    from quarot_fx.tools.outliers import by_layer, input_maxima

    status, out, _ = run(capsys, "outliers", model_dir, "--text", model_dir / "calib.txt", "--tokens", 40,
                         "--smoothrot", "-o", tmp_path / "o.png", "--json")
    result = json.loads(out)
    assert status == 0 and (tmp_path / "o.png").stat().st_size > 10_000
    assert set(result["max"]) == {"before rotation", "rotated", "rotated + SmoothRot"}
    # "before rotation" is the eager model's own activations: check against hooks
    model, ids = tiny_model("llama"), torch.arange(3, 43)[None]
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, float(a[0].abs().max())))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    model(ids)
    for h in hooks:
        h.remove()
    before = input_maxima(model, ids)["before rotation"]  # one entry per input: q/k/v share q_proj's
    assert set(before) == {k for k in seen if not k.endswith(("k_proj", "v_proj", "up_proj"))}
    assert all(abs(before[k] - seen[k]) <= 1e-5 * seen[k] for k in before)
    assert set(by_layer(before)) == {"q_proj", "o_proj", "gate_proj", "down_proj"}


def test_quantize_export_and_eval_the_export_through_compressed_tensors(model_dir, tmp_path, capsys):
    pytest.importorskip("compressed_tensors")
    torch._dynamo.reset()
    status, *_ = run(capsys, "quantize", model_dir, "--preset", "w4a16", "--weights", "gptq", "--calib",
                     model_dir / "calib.txt", "--calib-windows", 4, "--window", 64, "--option", "lowering=\"fx\"",
                     "--option", "r2=false", "-o", tmp_path / "q")
    assert status == 0
    with pytest.raises(SystemExit):  # argparse: not one of kv_cache, activation_scale
        run(capsys, "export", tmp_path / "q", "--approximate", "everything", "-o", tmp_path / "ct")
    status, out, _ = run(capsys, "export", tmp_path / "q", "-o", tmp_path / "ct", "--json")
    assert status == 0 and json.loads(out)["approximations"] == []
    assert (tmp_path / "ct" / "tokenizer.json").exists()
    evals = []
    for target in (tmp_path / "q", tmp_path / "ct"):
        torch._dynamo.reset()
        status, out, _ = run(capsys, "eval", target, "--text", model_dir / "eval.txt", "--windows", 2, "--window", 64,
                             "--json")
        evals.append(json.loads(out))
    assert "compressed-tensors" in evals[1]["model"]
    assert evals[1]["ppl"] == pytest.approx(evals[0]["ppl"], rel=1e-4)  # W4A16: the same model, rounding apart
    # GPTQ solved down_proj behind R4: without online transforms it cannot be re-derived, and says how
    status, _, err = run(capsys, "export", tmp_path / "q", "-o", tmp_path / "offline", "--no-online-transforms")
    assert status == 2 and "r4=False" in err and not (tmp_path / "offline").exists()


def test_export_without_online_transforms_lists_what_it_left_out(model_dir, tmp_path, capsys):
    torch._dynamo.reset()
    status, *_ = run(capsys, "quantize", model_dir, "--preset", "w4a16", "--option", "lowering=\"fx\"",
                     "--option", "r2=false", "-o", tmp_path / "q")
    assert status == 0
    status, out, _ = run(capsys, "export", tmp_path / "q", "-o", tmp_path / "ct", "--no-online-transforms", "--json")
    done = json.loads(out)
    assert status == 0 and done["left_out"] and all(line.startswith("R4 at ") for line in done["left_out"])
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["transform_config"] == {}


def test_export_of_something_that_is_not_a_saved_directory_names_it(model_dir, tmp_path, capsys):
    status, _, err = run(capsys, "export", model_dir, "-o", tmp_path / "ct")
    assert status == 2 and "not a directory written by 'quarot-fx quantize'" in err


# Issue 29, rows 4-6: export never destroys data; clear errors, exit 2, no traceback ---------------

def test_export_never_overwrites_the_base_model_and_asks_before_replacing(model_dir, tmp_path, capsys):
    from quarot_fx.directories import sha256

    torch._dynamo.reset()
    assert run(capsys, "quantize", model_dir, "--preset", "w4a16", "--option", "lowering=\"fx\"",
               "--option", "r2=false", "-o", tmp_path / "q")[0] == 0
    before = {p.name: sha256(p) for p in model_dir.iterdir() if p.is_file()}
    for extra in ([], ["--overwrite"]):
        status, _, err = run(capsys, "export", tmp_path / "q", "-o", model_dir, *extra)
        assert status == 2 and "directory of the base model itself" in err and "Traceback" not in err
    assert {p.name: sha256(p) for p in model_dir.iterdir() if p.is_file()} == before
    status, _, err = run(capsys, "export", tmp_path / "q", "-o", tmp_path / "q", "--overwrite")
    assert status == 2 and "saved DIR itself" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    status, _, err = run(capsys, "export", tmp_path / "q", "-o", tmp_path / "busy")
    assert status == 2 and "--overwrite" in err and (tmp_path / "busy" / "keep.txt").exists()
    assert run(capsys, "export", tmp_path / "q", "-o", tmp_path / "busy", "--overwrite")[0] == 0
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) >= ["config.json", "model.safetensors"]
    assert not (tmp_path / "busy" / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch directories left


def test_bad_inputs_exit_2_with_a_message(model_dir, tmp_path, capsys, monkeypatch):
    torch._dynamo.reset()
    status, _, err = run(capsys, "generate", model_dir, "--prompt", "", "--steps", 2)
    assert status == 2 and "--prompt is empty" in err
    assert run(capsys, "quantize", model_dir, "--preset", "w4a16", "--option", "lowering=\"fx\"",
               "-o", tmp_path / "q")[0] == 0
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    for broken, message in (({k: v for k, v in manifest.items() if k != "model"}, "no 'model' field"),
                            ({**manifest, "options": 4}, "'options' must be a dict"),
                            ({k: v for k, v in manifest.items() if k != "source"}, "does not record its base model")):
        (tmp_path / "q" / "manifest.json").write_text(json.dumps(broken))
        status, _, err = run(capsys, "eval", tmp_path / "q", "--text", model_dir / "eval.txt", "--window", 64)
        assert status == 2 and message in err and "Traceback" not in err, err
    monkeypatch.setenv("QUAROT_FX_INT_GEMM", "bogus")
    status, _, err = run(capsys, "eval", model_dir, "--preset", "w4a4kv4", "--text", model_dir / "eval.txt")
    assert status == 2 and "QUAROT_FX_INT_GEMM='bogus'" in err and "auto, int8, float, int4" in err


def test_the_python_api_names_what_is_wrong_before_compiling():
    import quarot_fx

    model = tiny_model("llama")
    compiled = quarot_fx.compile(model, preset="w4a4kv4", weights="gptq", lowering="fx",
                                 calibration=[torch.tensor([[5, 9, 300, 7]])])
    with pytest.raises(ValueError, match=r"calibration\[0\] holds token id 300, outside the model's vocabulary \(0..127\)"):
        compiled(torch.tensor([[1, 2, 3]]))
    with torch.device("meta"):
        empty = tiny_model("llama")
    with pytest.raises(ValueError, match="meta device: its weights were never loaded"):
        quarot_fx.compile(empty, preset="w4a4kv4")(torch.tensor([[1, 2, 3]], device="meta"))


def demo_rows(out: str) -> dict:
    """name → (perplexity, weights × fp16, KV × fp16, tokens/s) from the demo's table."""
    import re

    pattern = re.compile(r"^(\S.*?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+) \(\s*([\d.]+)×\)")
    return {m[1]: tuple(float(v) for v in m.groups()[1:]) for m in map(pattern.match, out.splitlines()) if m}


def test_demo_shows_every_row_with_bytes_and_speed_and_finds_the_saved_best(model_dir, tmp_path, capsys):
    torch._dynamo.reset()
    common = ("demo", "--model", model_dir, "--text", model_dir / "eval.txt", "--windows", 1, "--steps", 3)
    status, out, _ = run(capsys, *common, "--best", tmp_path / "absent")
    rows = demo_rows(out)
    assert status == 0 and list(rows) == ["float32", "w4a4kv4, no rotation", "w4a4kv4, rotated (QuaRot)",
                                          "w8a8kv8, rotated"], out
    assert "make demo-best" in out and "Whole demo:" in out
    float_ppl, float_weights, float_kv, float_speed, float_ratio = rows["float32"]
    assert float_weights == 2.0 and float_kv == 2.0 and float_ratio == 1.0 and float_speed > 0
    for name, (ppl, weights, kv, speed, ratio) in rows.items():
        assert ppl > 1 and speed > 0 and abs(ratio - speed / float_speed) < 0.02, name
        if name.startswith("w4a4kv4"):  # 4-bit linears, int8 head, float embeddings; 16-dim heads: 13 of 32 bytes
            assert weights < 1.0 and 0.40 <= kv <= 0.41, (name, weights, kv)
        elif name.startswith("w8a8kv8"):  # 8-bit weights run simulated on CPU: float32 bytes, and the demo says so
            assert weights > 1.5 and kv < 0.7 and "simulated" in out, (name, weights, kv)
    status, out, _ = run(capsys, "quantize", model_dir, "--preset", "w4a4kv4", "--option", "lowering=\"fx\"",
                         "-o", tmp_path / "best")
    torch._dynamo.reset()
    status, out, _ = run(capsys, *common, "--quick", "--best", tmp_path / "best")
    assert list(demo_rows(out)) == ["float32", "w4a4kv4, no rotation", "w4a4kv4, rotated (QuaRot)"], out
    status, out, _ = run(capsys, *common, "--best", tmp_path / "best")
    rows = demo_rows(out)
    assert status == 0 and list(rows)[-1] == "best saved: best" and "make demo-best" not in out, out
    assert rows["best saved: best"][1:3] == rows["w4a4kv4, rotated (QuaRot)"][1:3]  # the same bits as the RTN row
