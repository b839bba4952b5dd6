"""The compile contract: no silent wrong answer in ordinary use (one test per case of issue 11).

Each case was a silently wrong answer before: the compiled model ran with another model's
weights, with stale weights, as the float model, or with finite numbers where eager has NaN.
"""

import subprocess
import sys
import warnings

import pytest
import torch
import transformers as tf
from tiny_models import tiny_model, token_ids

import quarot_fx

FP = {"preset": "fp", "lowering": "fx"}
W4 = {"preset": "w4a4kv4", "lowering": "fx"}


def compile_quarot(model, **options):
    return torch.compile(model, backend="quarot", options={**FP, **options})


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# 1. Two models of the same shapes in one process ------------------------------------------------

@pytest.mark.parametrize("arch,lowering", [("llama", "fx"), ("gpt2", "fx"), ("qwen2", "inductor")])
def test_two_models_of_the_same_shapes_each_run_with_their_own_weights(arch, lowering):
    first, second = tiny_model(arch, seed=0), tiny_model(arch, seed=1)
    ids = token_ids()
    a = compile_quarot(first, lowering=lowering)
    b = compile_quarot(second, lowering=lowering)
    torch.testing.assert_close(logits(a, ids), logits(first, ids), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(b, ids), logits(second, ids), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(a, ids), logits(first, ids), rtol=1e-4, atol=1e-4)  # and back


def test_two_models_through_quarot_fx_compile_when_quantized():
    first, second = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = token_ids()
    a, b = quarot_fx.compile(first, **W4), quarot_fx.compile(second, **W4)
    out_a, out_b = logits(a, ids), logits(b, ids)
    assert rel(out_a, logits(first, ids)) < 0.5 and rel(out_b, logits(second, ids)) < 0.5
    assert rel(out_b, logits(first, ids)) > 0.5  # b is not a's model


# 2. A graph break inside repeated blocks ---------------------------------------------------------

class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = torch.nn.RMSNorm(d)
        self.up, self.down = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x):
        h = torch.nn.functional.silu(self.up(self.norm(x)))
        torch._dynamo.graph_break()
        return x + self.down(h)


class BrokenStack(torch.nn.Module):
    def __init__(self, d=32, layers=3, vocab=50):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(Block(d) for _ in range(layers))
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize("options", [{"rotation": "none"}, {}, {"preset": "w8a8kv8"}])
def test_graph_break_in_repeated_blocks_uses_each_blocks_weights(options):
    torch.manual_seed(0)
    model = BrokenStack().eval().requires_grad_(False)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        out, ref = compile_quarot(model, **options)(ids), model(ids)
    tolerance = 1e-4 if "preset" not in options else 0.05
    assert rel(out, ref) < tolerance


def test_output_attentions_with_sdpa_is_exact():
    model = tiny_model("llama")
    ids = token_ids()
    with torch.no_grad():
        out = compile_quarot(model)(ids, use_cache=False, output_attentions=True)
        ref = model(ids, use_cache=False, output_attentions=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)


# 3. The recompile limit: an error instead of the float model (tests/test_generation.py) -------------

# 4. generate() -----------------------------------------------------------------------------------

def greedy_by_steps(compiled, ids, steps):
    """The compiled forward called step by step with a cache: what generate() must match."""
    with torch.no_grad():
        out = compiled(ids, use_cache=True)
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(steps - 1):
            out = compiled(tokens[-1], past_key_values=out.past_key_values, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("how", ["torch.compile", "quarot_fx.compile"])
def test_generate_runs_the_quantized_model(how):
    model, ids = tiny_model("llama"), token_ids()
    compiled = (torch.compile(model, backend="quarot", options=W4) if how == "torch.compile"
                else quarot_fx.compile(model, **W4))
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        generated = compiled.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert reports, "generate() never called the backend"
    assert torch.equal(generated[:, ids.shape[1]:], greedy_by_steps(compiled, ids, 6))
    assert not hasattr(model, "_compiled_forward") and "forward" not in model.__dict__  # model untouched


def test_generate_on_other_backends_is_left_alone():
    model = tiny_model("llama", layers=1)
    compiled = torch.compile(model, backend="eager")
    assert compiled.generate.__self__ is model


# 5. Non-finite values ----------------------------------------------------------------------------

@pytest.mark.parametrize("kernels", ["integer", "fake"])
def test_nan_weight_propagates_and_is_reported_by_name(kernels):
    model, ids = tiny_model("llama"), token_ids()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.warns(quarot_fx.QuaRotWarning, match=r"model\.layers\.0\.mlp\.down_proj\.weight holds 1 non-finite"):
        out = logits(compile_quarot(model, **W4, kernels=kernels), ids)
    ref = logits(model, ids)
    assert not torch.isfinite(ref).any()
    assert not torch.isfinite(out)[~torch.isfinite(ref)].any()


@pytest.mark.parametrize("kernels", ["integer", "fake"])
def test_inf_activation_propagates(kernels):
    model, ids = tiny_model("llama"), token_ids()
    with torch.no_grad():
        model.model.embed_tokens.weight[ids[0, 2]] = float("inf")
    with pytest.warns(quarot_fx.QuaRotWarning):  # the embedding itself is reported too
        out = logits(compile_quarot(model, **W4, kernels=kernels), ids)
    ref = logits(model, ids)
    bad = ~torch.isfinite(ref)
    assert bad.any() and not torch.isfinite(out)[bad].any()


# 6. A cache filled by another model --------------------------------------------------------------

def test_cache_filled_by_the_eager_model_is_refused():
    model, ids = tiny_model("llama"), token_ids()
    compiled = compile_quarot(model, **W4)
    with torch.no_grad():
        eager = model(ids, use_cache=True)
        with pytest.raises(quarot_fx.ForeignCacheError, match="same compiled model"):
            compiled(ids[:, :1], past_key_values=eager.past_key_values, use_cache=True)


def test_cache_filled_by_another_configuration_is_refused():
    model, ids = tiny_model("llama"), token_ids()
    rotated, plain = compile_quarot(model), compile_quarot(model, rotation="none", preset="w8a8kv8")
    with torch.no_grad():
        filled = rotated(ids, use_cache=True)
        with pytest.raises(quarot_fx.ForeignCacheError):
            plain(ids[:, :1], past_key_values=filled.past_key_values, use_cache=True)


# 7. Weights changed after compiling --------------------------------------------------------------

@pytest.mark.parametrize("change", ["load_state_dict", "in_place", "new_parameter"])
def test_changed_weights_are_used(change):
    model, ids = tiny_model("llama"), token_ids()
    compiled = compile_quarot(model)
    logits(compiled, ids)  # compile with the first weights
    with torch.no_grad():
        if change == "load_state_dict":
            model.load_state_dict(tiny_model("llama", seed=5).state_dict())
        elif change == "in_place":
            model.model.layers[1].self_attn.v_proj.weight.mul_(-2)
        else:
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight), requires_grad=False)
    torch.testing.assert_close(logits(compiled, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


# 8. Eager attention ------------------------------------------------------------------------------

def gemma2(**kwargs):
    torch.manual_seed(0)
    config = tf.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             max_position_embeddings=256, pad_token_id=0)
    return tf.Gemma2ForCausalLM(config).eval().requires_grad_(False)


@pytest.mark.parametrize("make", [lambda: tiny_model("llama", attn_implementation="eager"), gemma2],
                         ids=["llama-eager", "gemma2"])
def test_eager_attention_gets_r2_r3_and_kv_quantization(make):
    model, ids = make(), token_ids()
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        out = compile_quarot(model, r3=True)(ids, use_cache=False).logits
    torch.testing.assert_close(out, logits(model, ids), rtol=1e-4, atol=1e-4)
    assert reports[0].region_counts().get("R2") == 2 and reports[0].region_counts().get("R3") == 2
    assert not [s for s in reports[0].skipped if not s.what.startswith("R1")], str(reports[0])  # Gemma2: post-norms
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        compile_quarot(model, **W4)(ids, use_cache=False)
    assert any("4 key/value tensors quantized" in n for n in reports[0].notes), str(reports[0])


def test_kv_note_only_when_something_was_quantized_and_unmatched_attention_is_a_skip():
    class OddAttention(torch.nn.Module):
        """Attention-like, but the probabilities meet v through an einsum the passes do not know."""

        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(20, 16), torch.nn.Linear(16, 20)

        def forward(self, ids):
            x = self.embed(ids)
            p = torch.softmax(x @ x.transpose(-1, -2), dim=-1)
            return self.head(torch.einsum("bst,btd->bsd", p, x))

    with torch.no_grad(), quarot_fx.collect_reports() as reports, pytest.warns(quarot_fx.QuaRotWarning):
        compile_quarot(OddAttention().requires_grad_(False), **W4)(torch.randint(0, 20, (1, 5)))
    assert not any("KV cache" in n for n in reports[0].notes)
    assert {s.what.split(" at ")[0] for s in reports[0].skipped} >= {"R2", "R3", "KV quantization"}


# 9. Dynamic shapes -------------------------------------------------------------------------------

def test_dynamic_shapes_keep_r2_and_give_the_fresh_compile_answer():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="quarot", options=W4, dynamic=True)
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        logits(compiled, token_ids(length=7))
        out = logits(compiled, token_ids(length=12))
    assert all(not r.skipped for r in reports), "\n".join(map(str, reports))
    torch._dynamo.reset()
    fresh = logits(torch.compile(model, backend="quarot", options=W4, dynamic=True), token_ids(length=12))
    torch.testing.assert_close(out, fresh)


# 10. Grad mode -----------------------------------------------------------------------------------

def test_grad_mode_with_trainable_parameters_is_a_clear_error():
    model = tiny_model("llama", trainable=True)
    with pytest.raises(Exception, match=r"compiles for inference.*torch.no_grad\(\)"):
        compile_quarot(model)(token_ids(), use_cache=False)
    with torch.no_grad():  # the same model is fine for inference
        compile_quarot(model)(token_ids(), use_cache=False)


# 11. Options and CLI -----------------------------------------------------------------------------

def test_options_must_be_a_mapping():
    with pytest.raises(Exception, match="options must be a mapping.*'w4a4kv4'"):
        torch.compile(tiny_model("llama", layers=1), backend="quarot", options="w4a4kv4")(token_ids())


def test_gsr_group_that_does_not_divide_the_width_is_an_error():
    model = tiny_model("llama", hidden=96, heads=4, kv_heads=2)
    with pytest.raises(Exception, match=r"gsr_group_size=64 does not divide the residual width 96.*\[2, 4, 8, 16, 32\]"):
        compile_quarot(model, rotation="gsr", gsr_group_size=64)(token_ids(), use_cache=False)


@pytest.mark.parametrize("argv,message", [
    (["demo", "--preset", "typo"], "invalid choice: 'typo'"),
    (["demo", "--model", "/no/such/dir"], "neither 'tiny', 'smollm2-135m' nor a local model directory"),
    (["demo", "--text", "/no/such/file"], "no such file"),
    (["hadamard", "0"], "must be a positive whole number"),
])
def test_cli_rejects_bad_arguments_with_a_plain_message(argv, message):
    run = subprocess.run([sys.executable, "-m", "quarot_fx.cli", *argv], capture_output=True, text=True)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr


def test_requested_work_left_undone_is_a_warning():
    model = tiny_model("llama", hidden=92, heads=2, kv_heads=1)  # no Hadamard of 92 (expanded) or 46 (R2 skipped)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compile_quarot(model)(token_ids(), use_cache=False)
    assert any(issubclass(w.category, quarot_fx.QuaRotWarning) and "head_dim=46" in str(w.message) for w in caught)

