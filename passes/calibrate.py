"""GPTQ inside the compiler: Hessians of each linear's input, collected on the rotated graph.

The rotation edits are materialized first, observers (identity ops that accumulate xᵀx)
go on every quantized linear's input after the online Hadamards, and the graph itself
runs on the calibration tokens: the token-id input is found structurally (what the
embedding lookup reads) and fed calibration windows cut to the compiled shape; every other
input keeps its example value. GPTQ results are cached with the weights, keyed by a
fingerprint of the calibration data, so a recompile runs no calibration.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from quarot_fx.report import Skip

from .graph_utils import as_site, origin
from .weights import GPTQWeight, QuantizeWeight, is_cached

class HessianObserver(torch.nn.Module):
    """Identity that adds xᵀx (over all tokens) to ``store[key]`` (the context's Hessians)."""

    def __init__(self, store: dict, key: str):
        super().__init__()
        self.store, self.key = store, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        h = flat.T @ flat
        self.store[self.key] = self.store[self.key] + h if self.key in self.store else h
        return x


def fingerprint(calibration) -> str:
    digest = hashlib.sha1()
    for tokens in calibration:
        digest.update(tokens.detach().cpu().to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


def token_input(residual_plans) -> fx.Node | None:
    """The placeholder holding token ids: what the residual stream's embedding reads."""
    for plan in residual_plans:
        ids = as_site(plan.seed).input_node
        if isinstance(ids, fx.Node) and origin(ids).op == "placeholder":
            return origin(ids)
    return None


def _chunks(calibration, shape) -> list[torch.Tensor]:
    tokens = torch.cat([t.reshape(-1) for t in calibration])
    size = shape[0] * shape[1]
    return [tokens[i:i + size].reshape(shape) for i in range(0, tokens.numel() - size + 1, size)]


def gptq_weights(ctx) -> None:
    """Pass: GPTQ edit on every quantized linear, with Hessians from the rotated graph."""
    config, gm = ctx.config, ctx.gm
    calibration = config.calibration
    edit = GPTQWeight(config.w_bits, config.w_group_size, config.w_clip_search, config.gptq_damp,
                      config.gptq_block_size, config.gptq_act_order, fingerprint(calibration))
    missing = [site for site in ctx.analysis.quantized
               if not is_cached(gm, ctx.edits(site), ctx.lifted.originals, ctx.fqn_of, extra=(edit,))]
    if missing:
        hessians = _collect_hessians(ctx, missing, calibration)
        if hessians is None:  # nothing to calibrate with: fall back to RTN, as reported
            rtn = QuantizeWeight(config.w_bits, config.w_group_size, config.w_clip_search)
            for site in ctx.analysis.quantized:
                ctx.edits(site).edits.append(rtn)
            return
    for site in ctx.analysis.quantized:
        # The Hessian is not part of the cache key: cached sites need none.
        hessian = hessians[site.node.name] if site in missing else None
        ctx.edits(site).edits.append(dataclasses.replace(edit, hessian=hessian))


def run_with_observers(ctx, sites, make_observer, desc: str) -> int | None:
    """Run the graph as it is now on the calibration tokens with ``make_observer(site)`` (an
    identity module) on each site's input; returns the number of chunks run, None if the graph
    has no token-id input to feed. The observers are removed afterwards."""
    gm = ctx.gm
    tokens_node = token_input(ctx.analysis.residual)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if tokens_node is None:
        return None
    observers = []
    for i, site in enumerate(sites):
        name = f"qfx_observer_{i}"
        gm.add_submodule(name, make_observer(site))
        with gm.graph.inserting_before(site.node):
            obs = gm.graph.call_module(name, (site.input_node,))
        site.node.replace_input_with(site.input_node, obs)
        observers.append(obs)
    gm.recompile()
    inputs = list(ctx.lifted.runtime_inputs(ctx.example_inputs))
    index = placeholders.index(tokens_node)
    chunks = _chunks(ctx.config.calibration, tuple(inputs[index].shape))
    with torch.no_grad():
        for chunk in tqdm(chunks, desc=desc, leave=False):
            inputs[index] = chunk.to(inputs[index].device)
            gm(*inputs)
    for obs in observers:
        obs.replace_all_uses_with(obs.args[0])
        gm.graph.erase_node(obs)
        gm.delete_submodule(obs.target)
    gm.recompile()
    return len(chunks)


def _collect_hessians(ctx, sites, calibration) -> dict | None:
    ctx.hessians.clear()
    count = run_with_observers(ctx, sites, lambda site: HessianObserver(ctx.hessians, site.node.name),
                               "GPTQ calibration")
    if count is None:
        ctx.report.skipped.append(Skip("GPTQ", "no token-id input found to feed calibration data; RTN used"))
        return None
    ctx.report.counters["gptq_calibration_chunks"] += count
    ctx.report.notes.append(f"GPTQ: Hessians from {count} calibration chunks through the rotated graph")
    hessians = dict(ctx.hessians)
    ctx.hessians.clear()  # the edits hold what they need; the context keeps no big tensors
    return hessians
