import math

import torch
from tiny_models import tiny_model

from quarot_fx.tools.evaluate import calibration_windows, perplexity, read_eval_text, windows


def test_windows_are_non_overlapping_from_the_start():
    tokens = torch.arange(10_000)
    parts = windows(tokens, 3)
    assert [p.shape for p in parts] == [(1, 2048)] * 3
    assert torch.equal(torch.cat([p[0] for p in parts]), tokens[:3 * 2048])
    assert len(windows(tokens)) == 4  # 'all' = every full window


def test_calibration_windows_follow_the_protocol():
    import random

    tokens = torch.arange(50_000)
    parts = calibration_windows(tokens, count=4, length=2048, seed=0)
    random.seed(0)
    starts = [random.randint(0, 50_000 - 2049) for _ in range(4)]
    assert [int(p[0, 0]) for p in parts] == starts and all(p.shape == (1, 2048) for p in parts)


def test_read_eval_text_joins_lines_as_the_protocol_says(tmp_path):
    path = tmp_path / "t.raw"
    path.write_text("a\nb\n", encoding="utf-8")
    assert read_eval_text(path) == "a\n\nb\n\n"


def test_perplexity_is_exp_of_mean_nll():
    model = tiny_model("llama")
    parts = [torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in parts:
            logp = torch.log_softmax(model(ids, use_cache=False).logits[0, :-1], -1)
            nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
            count += 15
    assert math.isclose(perplexity(model, parts, progress=False), math.exp(nll / count), rel_tol=1e-5)


def test_unknown_text_source_says_what_it_accepts():
    import pytest

    with pytest.raises(FileNotFoundError, match="wikitext-2"):
        read_eval_text("no/such/file.txt")
