"""The backend with no transform enabled must compute exactly what eager computes."""

import importlib.metadata

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model, token_ids

import quarot_fx
from quarot_fx.backend import private_copy, quarot_backend
from quarot_fx.passes.lift_params import fqn_of_source, lift_parameters

IDENTITY = {"preset": "fp", "rotation": "none"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def greedy(model, ids, steps=8):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits)


def test_entry_point_resolves_to_backend():
    names = {ep.name: ep for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")}
    assert names["quarot"].load() is quarot_backend
    assert torch._dynamo.lookup_backend("quarot") is quarot_backend


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_inductor_identity_without_cache(arch):
    model, ids = tiny_model(arch), token_ids()
    compiled = torch.compile(model, backend="quarot", options=IDENTITY, fullgraph=True)
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        out = compiled(ids, use_cache=False).logits
        ref = model(ids, use_cache=False).logits
    assert rel_err(out, ref) <= 1e-5
    n_params, n_buffers = len(list(model.parameters())), len(list(model.buffers()))
    assert len(reports) == 1
    assert n_params <= reports[0].lifted_constants <= n_params + n_buffers  # every weight lifted


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fx_lowering_generation_with_kv_cache(arch):
    model, ids = tiny_model(arch), token_ids()
    ref_tokens, ref_logits = greedy(model, ids)
    model.forward = torch.compile(model.forward, backend="quarot", options={**IDENTITY, "lowering": "fx"})
    with quarot_fx.collect_reports() as reports:
        tokens, logits = greedy(model, ids)
    assert reports, "the backend was not used"
    assert torch.equal(tokens, ref_tokens)
    assert rel_err(logits, ref_logits) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_inductor_generation_with_kv_cache(arch):
    model, ids = tiny_model(arch), token_ids()
    ref_tokens, ref_logits = greedy(model, ids)
    model.forward = torch.compile(model.forward, backend="quarot", options=IDENTITY)
    tokens, logits = greedy(model, ids)
    assert torch.equal(tokens, ref_tokens)
    assert rel_err(logits, ref_logits) <= 1e-5


def test_new_sequence_lengths_reuse_one_graph():
    model = tiny_model("qwen2")
    compiled = torch.compile(model, backend="quarot", options=IDENTITY)
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        for length in (8, 11, 13):
            ids = token_ids(length=length)
            assert rel_err(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits) <= 1e-5
    assert len(reports) == 1  # batch and sequence are dynamic from the first call


def lift_in_backend(model, ids):
    """Lift inside a backend call (Dynamo clears the sources afterwards): (gm, lifted)."""
    seen = {}

    def record(gm, example_inputs):
        seen["gm"] = private_copy(gm)
        seen["lifted"] = lift_parameters(seen["gm"], example_inputs)
        return gm.forward

    torch.compile(model, backend=record, fullgraph=True)(ids, use_cache=False)
    return seen["gm"], seen["lifted"]


def test_lifting_keys_constants_by_fqn_without_copying():
    model = tiny_model("llama", layers=1)
    gm, lifted = lift_in_backend(model, token_ids())
    params = dict(model.named_parameters())
    assert set(lifted.fqn_by_attr.values()) == set(params) | {"model.rotary_emb.inv_freq"}
    for attr, fqn in lifted.fqn_by_attr.items():
        if fqn in params:
            assert getattr(gm, attr).data_ptr() == params[fqn].data_ptr()
    assert all(n.op != "placeholder" or "parameters" not in n.name for n in gm.graph.nodes)


def test_buffer_written_in_place_stays_an_input():
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))
            self.scale = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            self.calls.add_(1)
            return x * self.scale + self.calls

    module = Counter()
    compiled = torch.compile(module, backend="quarot", options={**IDENTITY, "lowering": "fx"})
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        first, second = compiled(torch.ones(3)), compiled(torch.ones(3))
    assert torch.equal(first, torch.full((3,), 3.0)) and torch.equal(second, torch.full((3,), 4.0))
    assert any(s.what == "buffer calls" and "in place" in s.why for s in reports[0].skipped)


@pytest.mark.parametrize("root", ["self", "args"])
def test_fqn_of_source_walks_dynamo_source_chains(root):
    from torch._dynamo.source import AttrSource, DictGetItemSource, GetItemSource, LocalSource

    base = LocalSource("self") if root == "self" else GetItemSource(LocalSource("args"), 0)
    for name in ("model", "layers", "3"):
        base = DictGetItemSource(AttrSource(base, "_modules"), name)
    weight = DictGetItemSource(AttrSource(base, "_parameters"), "weight")
    assert fqn_of_source(weight) == "model.layers.3.weight"
    assert fqn_of_source(DictGetItemSource(LocalSource("kwargs"), "input_ids")) is None


def test_gptq_without_calibration_is_refused():
    model = tiny_model("llama", layers=1)
    with pytest.raises(Exception, match="weights='gptq' needs calibration"):
        torch.compile(model, backend="quarot", options={"preset": "w4a4kv4", "weights": "gptq"})(token_ids())


def test_bad_option_through_torch_compile_names_the_key():
    model = tiny_model("llama", layers=1)
    with pytest.raises(Exception, match="unknown quarot option.*'bits'"):
        torch.compile(model, backend="quarot", options={"bits": 4})(token_ids())
    with pytest.raises(ValueError, match="rotation must be one of"):
        quarot_fx.compile(model, rotation="dct")
