"""Graph fuzzer: random decoder-like modules, compiled rotation-only, always equal eager.

Blocks mix what the analysis can rotate (pre-norm MLPs and GLUs, attention, scalar scales,
raw linear reads of the residual) with what it must refuse or undo (post-norms,
non-commuting writers and readers, shared weights, graph breaks, a block instance repeated).
Whatever the compiler decides, the function must not change. CI runs a bounded number of
examples; ``make fuzz`` runs many more (``QUAROT_FUZZ_EXAMPLES``).
"""

import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quarot_fx

EXAMPLES = int(os.environ.get("QUAROT_FUZZ_EXAMPLES", "12"))
BLOCKS = ("mlp", "glu", "attention", "post_norm", "raw_read", "tanh_read", "tanh_write", "scale",
          "layer_norm_mlp", "shared", "graph_break")


class FuzzBlock(torch.nn.Module):
    def __init__(self, kind: str, d: int, heads: int, shared: torch.nn.Linear):
        super().__init__()
        self.kind, self.heads = kind, heads
        self.norm = torch.nn.RMSNorm(d) if kind != "layer_norm_mlp" else torch.nn.LayerNorm(d)
        self.a, self.b, self.c = torch.nn.Linear(d, 2 * d), torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d, bias=False) for _ in range(4))
        self.shared = shared

    def attention(self, n):
        b, s, d = n.shape
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(n)), split(self.k(n)), split(self.v(n)), is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, s, d))

    def forward(self, x):
        kind = self.kind
        if kind in ("mlp", "layer_norm_mlp"):
            return x + self.c(F.gelu(self.a(self.norm(x))))
        if kind == "glu":
            n = self.norm(x)
            return x + self.c(F.silu(self.a(n)) * self.b(n))
        if kind == "attention":
            return x + self.attention(self.norm(x))
        if kind == "post_norm":
            return self.norm(x + self.c(F.relu(self.a(x))))
        if kind == "raw_read":
            return x + self.c(self.a(x))
        if kind == "tanh_read":
            return x + self.c(self.a(torch.tanh(x)))
        if kind == "tanh_write":
            return torch.tanh(x)
        if kind == "scale":
            return x * 0.5
        if kind == "shared":  # one weight read at two sites
            n = self.norm(x)
            return x + self.shared(n) - 0.5 * self.shared(n * 2.0)
        torch._dynamo.graph_break()
        return x + self.c(F.silu(self.a(self.norm(x))))


class FuzzModel(torch.nn.Module):
    def __init__(self, kinds, d, heads, vocab, repeat, tied):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        shared = torch.nn.Linear(d, d)
        blocks = [FuzzBlock(k, d, heads, shared) for k in kinds]
        if repeat and blocks:
            blocks.append(blocks[0])  # the same block instance twice: shared weights across layers
        self.blocks = torch.nn.ModuleList(blocks)
        self.final = torch.nn.RMSNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final(x))


@st.composite
def fuzz_models(draw):
    d = draw(st.sampled_from([16, 20, 22, 32]))  # 22 has no Hadamard matrix
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if d % h == 0 and (d // h) % 2 == 0]))
    kinds = draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=4))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = FuzzModel(kinds, d, heads, vocab=40, repeat=draw(st.booleans()), tied=draw(st.booleans()))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
                module.weight.normal_(1.0, 0.3)
        if draw(st.booleans()):  # an outlier channel in the residual stream
            model.embed.weight[:, draw(st.integers(0, d - 1))] *= 30.0
    return model.eval().requires_grad_(False)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(model=fuzz_models(), rotation=st.sampled_from(["hadamard", "randomized_hadamard", "gsr", "random"]),
       length=st.integers(1, 9))
def test_rotation_only_compile_equals_eager(model, rotation, length):
    torch._dynamo.reset()
    ids = torch.randint(0, 40, (2, length), generator=torch.Generator().manual_seed(length))
    compiled = torch.compile(model, backend="quarot", options={"preset": "fp", "rotation": rotation, "lowering": "fx"})
    with torch.no_grad(), quarot_fx.collect_reports() as reports:
        out, ref = compiled(ids), model(ids)
    assert reports, "the backend never ran"
    error = ((out - ref).norm() / ref.norm()).item()
    assert error < 1e-4, f"relative error {error:.2e}\n" + "\n".join(map(str, reports))
