"""Names in reports come from the parameters' fully qualified names, whatever Dynamo calls the root.

transformers ≥ 5.24 wraps ``forward``, so Dynamo spells the model ``L['args'][0]`` instead of
``L['self']``; a report must name the same parameters either way.
"""

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model, token_ids

import quarot_fx
from quarot_fx.passes.graph_utils import module_path


@pytest.mark.parametrize("spelling", [
    "L['self'].model.layers.0.mlp",
    "L['args'][0].model.layers.0.mlp",
    "L['self']._modules['model']._modules['layers']._modules['0']._modules['mlp']",
    "L['args'][0]._modules['model'].layers._modules['0'].mlp",
])
def test_module_path_drops_any_root_spelling(spelling):
    assert module_path(spelling) == "model.layers.0.mlp"


def test_module_path_of_the_root_is_empty():
    assert module_path("L['self']") == "" and module_path("L['args'][0]") == ""


class Wrapper(torch.nn.Module):
    """Called as ``self``: Dynamo names this root ``L['self']`` (the HF model's own forward is wrapped)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return self.inner(ids, use_cache=False).logits


def report_of(model, *args, **kwargs):
    compiled = torch.compile(model, backend="quarot", options={"preset": "w8a8kv8", "lowering": "fx"})
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        compiled(*args, **kwargs)
    return reports[0]


def assert_names_are_real(report, model):
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    assert report.linears, str(report)
    for entry in report.linears:
        assert entry.weight in params, entry
        assert entry.module in modules, entry
        assert f"    {entry.name}: offline" in str(report)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_weight_line_names_a_real_parameter(arch):
    model = tiny_model(arch)
    assert_names_are_real(report_of(model, token_ids(), use_cache=False), model)


def test_names_are_the_same_under_either_root_spelling():
    model = tiny_model("llama")
    direct = report_of(model, token_ids(), use_cache=False)
    wrapped = report_of(Wrapper(model), token_ids())
    assert_names_are_real(wrapped, Wrapper(model))
    assert [f"inner.{e.weight}" for e in direct.linears] == [e.weight for e in wrapped.linears]
    head = next(e for e in direct.linears if e.module == "lm_head")
    assert head.weight == "lm_head.weight" and "(untied)" not in head.name


def test_tied_head_names_the_embedding_it_reads():
    model = tiny_model("gemma")  # tied lm_head
    head = next(e for e in report_of(model, token_ids(), use_cache=False).linears if e.module == "lm_head")
    assert head.weight == "model.embed_tokens.weight" and "(untied)" in head.name
