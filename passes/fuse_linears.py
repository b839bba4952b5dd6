"""Sibling ``quantized_linear`` calls that read the same activation codes become one call.

q/k/v read one quantized input, and so do gate/up: one GEMM over the weights stacked along the
output dimension computes every output exactly as the separate calls do (each output channel is
its own integer dot product and its own scales), so the bits are unchanged, while a decode step
makes 4 calls per layer instead of 7 (each call costs more in dispatch than its GEMV at decode)
and a prefill GEMM gets wider. The stacked weights are kept with the first one, so recompiles
share them.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .lowering import QUANTIZE_PER_TOKEN, _decide_gemm
from .surgery import QUANTIZED_LINEAR, _constant, drop_unused_constants

STACKED = "stacked siblings"  # weight-store memo key


def _sibling_groups(graph: fx.Graph):
    """Lists of ≥ 2 ``quantized_linear`` nodes reading the same codes and scales with the same
    in_features, dtype, policy and scale groups, all with a bias or none."""
    for codes in [n for n in graph.nodes if n.op == "call_function" and n.target is operator.getitem
                  and isinstance(n.args[0], fx.Node) and n.args[0].target is QUANTIZE_PER_TOKEN and n.args[1] == 0]:
        groups: dict[tuple, list] = {}
        for user in codes.users:
            if user.target is QUANTIZED_LINEAR and user.args[0] is codes:
                scale = user.args[3].meta["example_value"]
                key = (user.args[1], *user.args[5:], scale.shape[1], user.args[4] is None)
                groups.setdefault(key, []).append(user)
        yield from (group for group in groups.values() if len(group) > 1)


def fuse_sibling_linears(ctx) -> None:
    """Pass: stack the weights of sibling integer linears into one call, sliced back per user."""
    gm, fused, calls = ctx.gm, 0, 0
    for group in list(_sibling_groups(gm.graph)):
        parts = [[getattr(gm, n.args[i].target) if n.args[i] is not None else None for i in (2, 3, 4)] for n in group]
        first = parts[0][0]
        key = (STACKED, tuple((id(t), t._version) for p in parts for t in p if t is not None))
        weight, scale, bias = ctx.weights.memo(first, key, lambda: [
            torch.cat([p[i] for p in parts]) if parts[0][i] is not None else None for i in range(3)])
        anchor = group[0]
        constants = [_constant(gm, anchor, f"qfx_stacked__{anchor.name}__{name}", t) if t is not None else None
                     for name, t in (("weight", weight), ("scale", scale), ("bias", bias))]
        with gm.graph.inserting_before(anchor):
            stacked = gm.graph.call_function(QUANTIZED_LINEAR, (*anchor.args[:2], *constants, *anchor.args[5:]))
            start = 0
            for node, (w, _, _) in zip(group, parts):
                piece = gm.graph.call_function(torch.narrow, (stacked, -1, start, w.shape[0]))
                piece.meta.update(node.meta)
                node.replace_all_uses_with(piece)
                start += w.shape[0]
        stacked.meta.update({k: v for k, v in anchor.meta.items() if k != "example_value"})
        source = anchor.args[0].args[0].args[0]  # codes ← quantize_per_token(source, …)
        for node in group:
            gm.graph.erase_node(node)
        _decide_gemm(ctx.report, stacked, source, ctx.config)
        fused, calls = fused + len(group), calls + 1
    ctx.report.counters["stacked_linears"] += fused
    ctx.report.counters["stacked_calls"] += calls
    if fused:
        ctx.report.notes.append(f"integer kernels: {fused} linears reading the same codes stacked into {calls} "
                                "wider calls (q/k/v, gate/up): the same bits, fewer calls")
    drop_unused_constants(gm)
