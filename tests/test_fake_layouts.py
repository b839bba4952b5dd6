"""The ops' fake (meta) functions give the shapes and strides their real calls return, on the C++
fast paths (``native_ops``) and on the Python bodies: ``torch.library.opcheck``, whose fake check
compares strides too. Why it matters: quarot's compiled graphs run without Inductor's run-time
``assert_size_stride`` on every op output (about 700 checks per decode step of SmolLM2-135M), so
a fake that disagreed with its op would go unnoticed there; here it fails."""

from __future__ import annotations

import pytest
import torch
from test_packed_attention import attention_inputs

from quarot_fx.kernels import int8_query_attention, native_ops, packed_attention
from quarot_fx.kernels.int8_linear import int8_channel_codes, int8_weight_linear


@pytest.fixture(params=["C++", "Python"])
def calls(request):
    """Each op through its C++ kernel (where it covers the call) and through its Python body."""
    native_ops.load()
    if request.param == "C++":
        yield
    else:
        with native_ops.suspended():
            yield


MASKS = {"none": None, "bool": lambda tokens: torch.arange(tokens) < tokens - 3,
         "float": lambda tokens: torch.where(torch.arange(tokens) < tokens - 3, 0.0, float("-inf"))}


@pytest.mark.usefixtures("calls")
@pytest.mark.parametrize("rows, mask, causal", [(1, "bool", False), (1, "none", False), (3, "float", False),
                                                (20, "none", True), (20, "bool", False)])
def test_packed_attention_fake_matches(rows, mask, causal):
    tokens = 70
    inputs = attention_inputs(1, 3, 3, rows, tokens, 64, 4, seed=0)
    attn_mask = MASKS[mask](tokens).reshape(1, 1, 1, tokens) if MASKS[mask] else None
    torch.library.opcheck(packed_attention.default, (*inputs, 4, 64, torch.float32, attn_mask, 0.125, causal, True))


@pytest.mark.usefixtures("calls")
def test_int8_query_attention_fake_matches():
    inputs = attention_inputs(1, 2, 2, 40, 40, 64, 4, seed=1)  # 40 causal rows over 40 cached positions
    torch.library.opcheck(int8_query_attention.default, (*inputs, 4, 64, torch.float32, None, None, True, True))


@pytest.mark.usefixtures("calls")
@pytest.mark.parametrize("rows", [1, 20])
def test_int8_weight_linear_fake_matches(rows):
    g = torch.Generator().manual_seed(0)
    codes, scale = int8_channel_codes(torch.randn(40, 96, generator=g))
    torch.library.opcheck(int8_weight_linear.default, (torch.randn(1, rows, 96, generator=g), codes, scale, None))
