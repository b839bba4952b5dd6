"""The GPTQ/OBR weight pass: Hessians from the rotated graph, run by the window runner.

GPTQ (``gptq_weights``; OBR and Wanda-masked RTN through the same edit) uses
:func:`~quarot_fx.passes.windows.run_calibration` in two ways (option ``gptq_sequential``):

* one pass: Hessians of every quantized linear's input on the rotated float graph;
* sequential (the GPTQ and QuaRot papers): each site's Hessian comes from inputs produced by
  the already-quantized earlier sites, with activation and KV quantization as configured, so
  later layers compensate what earlier ones lost.

GPTQ results are cached with the weights, keyed by a fingerprint of the calibration data, so a
recompile runs no calibration.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from quarot_fx.report import Skip

from .edits import GPTQWeight, QuantizeWeight
from .weight_store import CALIBRATED_CODES
from .windows import run_calibration


def _hessian(inputs) -> torch.Tensor:
    """Σ xᵀx over every token of every window (float32)."""
    total = None
    for x in inputs:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        total = flat.T @ flat if total is None else total.addmm_(flat.T, flat)
    return total


def gptq_weights(ctx) -> None:
    """Pass: GPTQ edit on every quantized linear, with Hessians from the rotated graph (see the
    module docstring for one-pass vs sequential); from a loaded artifact's codes when there is one."""
    config = ctx.config
    edit = GPTQWeight(config.w_bits, config.w_group_size, config.w_clip_search, config.gptq_damp,
                      config.gptq_block_size, config.gptq_act_order, config.calibration_id(),
                      config.gptq_sequential, config.weights, config.pruned_fraction, config.sparsity_pattern)
    sites = ctx.analysis.quantized
    name = {"gptq": "GPTQ", "obr": "OBR", "rtn": "Wanda mask + RTN"}.get(config.weights, config.weights)
    if config.calibrated is not None:  # a loaded artifact: the solved codes, no calibration
        for site in sites:
            fqn = ctx.fqn_of(site.weight_node.target)
            ctx.edits(site).edits.append(dataclasses.replace(edit, solved=config.calibrated.get("weights", fqn)))
        ctx.report.notes.append(f"{name}: {len(sites)} weights restored from a saved artifact (no calibration)")
        return

    def record(site, solved_edit: GPTQWeight) -> GPTQWeight:
        """Keep the codes for quarot_fx.save, also across recompiles (cached with the weight)."""
        param = ctx.weights.key(ctx.edits(site))[0]
        key = (CALIBRATED_CODES, edit)
        if solved_edit.solved is not None or ctx.weights.has_memo(param, key):
            codes = ctx.weights.memo(param, key, lambda: solved_edit.solved)
            ctx.artifact.calibrated.weights[ctx.fqn_of(site.weight_node.target)] = codes
        return solved_edit

    missing = [site for site in sites
               if not ctx.weights.has(ctx.edits(site), extra=(edit,), packed=config.keeps_weight_codes)]
    if not missing:
        for site in sites:  # the Hessian is not part of the cache key: cached sites need none
            record(site, edit)
            ctx.edits(site).edits.append(edit)
        return
    # Sequential: the later sites' inputs depend on the earlier quantized weights, so all run.
    solved: dict[fx.Node, GPTQWeight] = {}

    shared: dict[fx.Node, torch.Tensor] = {}  # q/k/v (gate/up) read one input: one Hessian

    def hessian(site, inputs):
        if site.input_node not in shared:
            shared.clear()
            shared[site.input_node] = _hessian(inputs)
        return shared[site.input_node]

    def solve(site, inputs):
        logical, dtype = ctx.weights.edited(ctx.edits(site))
        codes = dataclasses.replace(edit, hessian=hessian(site, inputs)).codes(logical)
        solved[site.node] = record(site, dataclasses.replace(edit, solved=codes))
        return logical, dtype

    def one_pass(site, inputs):
        solve(site, inputs)

    def sequential(site, inputs):
        logical, dtype = solve(site, inputs)
        quantized, _ = solved[site.node].apply(logical, None)
        return quantized.to(dtype)

    count = run_calibration(ctx, sites if config.gptq_sequential else missing,
                            sequential if config.gptq_sequential else one_pass,
                            f"{name} (sequential)" if config.gptq_sequential else f"{name} calibration")
    if count is None:  # nothing to calibrate with: fall back to RTN, as reported
        ctx.report.skipped.append(Skip(name, "no token-id input found to feed calibration data; dense RTN used"
                                       + (" and nothing pruned" if config.prunes else "")))
        rtn = QuantizeWeight(config.w_bits, config.w_group_size, config.w_clip_search)
        for site in sites:
            ctx.edits(site).edits.append(rtn)
        return
    ctx.report.counters["gptq_calibration_chunks"] += count
    how = "sequentially (earlier sites quantized)" if config.gptq_sequential else "in one pass"
    ctx.report.notes.append(f"{name}: Hessians from {count} calibration chunks through the rotated graph, {how}")
    for site in sites:
        ctx.edits(site).edits.append(solved.get(site.node) or record(site, edit))
