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
