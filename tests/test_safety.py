"""Where invariance cannot be proved, the compiler leaves the part alone or inverts, and says so."""

import pytest
import torch
from tiny_models import tiny_model, token_ids

import quarot_fx


class RMSNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(1.0 + 0.3 * torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Toy(torch.nn.Module):
    """A one-block residual model with a chosen defect on the residual stream."""

    def __init__(self, variant, d=32, vocab=40):
        super().__init__()
        torch.manual_seed(0)
        self.variant = variant
        self.emb = torch.nn.Embedding(vocab, d)
        self.norm, self.post_norm, self.final_norm = RMSNorm(d), RMSNorm(d), RMSNorm(d)
        self.proj = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.emb(ids)
        update = self.proj(self.norm(h))
        if self.variant == "post_norm":
            h = h + self.post_norm(update)
        elif self.variant == "unknown_writer":
            h = h + torch.tanh(update)
        else:
            h = h + update
        logits = self.head(self.final_norm(h))
        if self.variant == "unknown_reader":
            return logits + h.sum(-1, keepdim=True)
        if self.variant == "returns_residual":
            return logits, h
        return logits


def compile_and_compare(model, *args, **kwargs):
    compiled = torch.compile(model, backend="quarot", options={"preset": "fp", "lowering": "fx", "r3": True})
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        out, ref = compiled(*args, **kwargs), model(*args, **kwargs)
    flat_out = torch.utils._pytree.tree_leaves(out)
    flat_ref = torch.utils._pytree.tree_leaves(ref)
    assert len(flat_out) == len(flat_ref)
    for a, b in zip(flat_out, flat_ref):
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    return max(reports, key=lambda r: len(r.regions))  # the main graph, if Dynamo split the model


IDS = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))


def test_clean_toy_is_rotated():
    report = compile_and_compare(Toy("clean"), IDS)
    assert report.region_counts()["R1"] == 1 and not report.skipped and not report.notes


def test_norm_with_post_scale_on_residual_is_left_unrotated():
    report = compile_and_compare(Toy("post_norm"), IDS)
    assert "R1" not in report.region_counts()
    assert any("post-scale" in s.why for s in report.skipped), str(report)


def test_unknown_op_writing_the_residual_is_left_unrotated():
    report = compile_and_compare(Toy("unknown_writer"), IDS)
    assert "R1" not in report.region_counts()
    assert any("'tanh'" in s.why for s in report.skipped), str(report)


@pytest.mark.parametrize("variant,where", [("unknown_reader", "'sum'"), ("returns_residual", "graph output")])
def test_unabsorbed_reads_get_an_explicit_inverse(variant, where):
    report = compile_and_compare(Toy(variant), IDS)
    assert report.region_counts()["R1"] == 1
    assert report.counters["explicit_inverses"] >= 1 and any(where in n for n in report.notes), str(report)


def test_output_hidden_states_of_rmsnorm_model_are_inverted():
    model = tiny_model("llama")
    report = compile_and_compare(model, token_ids(), use_cache=False, output_hidden_states=True)
    assert report.region_counts() == {"R1": 1, "R2": 2, "R3": 2, "R4": 2}
    assert report.counters["explicit_inverses"] >= 2


def test_output_hidden_states_of_layernorm_model_skip_r1_but_keep_the_rest():
    report = compile_and_compare(tiny_model("gpt2"), token_ids(), use_cache=False, output_hidden_states=True)
    assert "R1" not in report.region_counts()
    assert any("mean-centered" in s.why for s in report.skipped)
    assert report.region_counts() == {"R2": 2, "R3": 2, "R4": 2}


def test_sizes_without_hadamard_are_skipped_or_padded():
    model = tiny_model("llama", hidden=92, heads=2, kv_heads=1, ffn=92)  # no Hadamard of 92 or head_dim 46
    report = compile_and_compare(model, token_ids(), use_cache=False)
    why = " ".join(s.why for s in report.skipped)
    assert "head_dim=46" in why  # R2/R3 per head: skipped with the reason
    assert report.region_counts() == {"R1": 1, "R4": 2}  # the residual expanded, R4 zero-padded
    assert "expanded 92 → 96" in str(report) and "padded from 92" in str(report)


def test_random_rotation_works_where_hadamard_cannot():
    model = tiny_model("llama", hidden=92, heads=2, kv_heads=1)
    compiled = torch.compile(model, backend="quarot", options={"preset": "fp", "lowering": "fx", "rotation": "random"})
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        ids = token_ids()
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-5)
    assert reports[0].region_counts()["R1"] == 1


def test_explain_reports_without_changing_the_model():
    model = tiny_model("qwen2")
    ids = token_ids()
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    explanation = quarot_fx.explain(model, ids, model_kwargs={"use_cache": False}, preset="fp", r3=True)
    assert explanation.region_counts() == {"R1": 1, "R2": 2, "R3": 2, "R4": 2}
    text = str(explanation)
    assert "R1" in text and "residual stream" in text and "analyze_invariance" in text
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, before)


class LayerNormToy(torch.nn.Module):
    """Pre-LN block with a LayerNorm that has no affine parameters, and one that has."""

    def __init__(self, d=32, vocab=40):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, d)
        self.norm = torch.nn.LayerNorm(d, elementwise_affine=False)
        self.final = torch.nn.LayerNorm(d)
        self.proj = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, vocab)
        with torch.no_grad():
            self.final.weight.normal_(1.0, 0.3)
            self.final.bias.normal_(0.0, 0.3)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.proj(self.norm(h))
        return self.head(self.final(h))


def test_layernorm_without_affine_parameters_is_rotated():
    report = compile_and_compare(LayerNormToy(), IDS)
    assert report.region_counts()["R1"] == 1
    assert "mean-centered" in str(report) and not report.skipped


# Issue 29, row 7: the C kernels' library is loaded only from a directory only this user can write --

def test_the_kernel_cache_is_private_and_a_writable_library_is_rebuilt(tmp_path, monkeypatch):
    import os

    from quarot_fx.kernels import native

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anyone may plant a file here
    monkeypatch.setenv("QUAROT_FX_CACHE", str(shared))
    private = native._cache_dir()
    assert private != shared and (private.stat().st_mode & 0o077) == 0
    if os.getuid() == 0:  # only root can hand a directory to another user
        owned_by_other = tmp_path / "other"
        owned_by_other.mkdir(mode=0o700)
        os.chown(owned_by_other, 65534, 65534)
        monkeypatch.setenv("QUAROT_FX_CACHE", str(owned_by_other))
        assert native._cache_dir() != owned_by_other
    mine = tmp_path / "mine"
    monkeypatch.setenv("QUAROT_FX_CACHE", str(mine))
    assert native._cache_dir() == mine and (mine.stat().st_mode & 0o777) == 0o700
    planted = mine / "native-x.so"
    planted.write_bytes(b"not a library")
    os.chmod(planted, 0o666)  # group/other may write it: it is not loaded
    assert not native._private(planted, __import__("stat").S_IFREG)
    if native.library() is None:
        pytest.skip(native.unavailable_reason())
    native._build(os.environ.get("CC", "cc"), (), planted)
    assert native._private(planted, __import__("stat").S_IFREG) and planted.read_bytes()[:4] == b"\x7fELF"
