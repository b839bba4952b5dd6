"""The pass pipeline: an ordered list of plain functions over one shared context.

Each pass reads and rewrites ``ctx.gm`` and records what it did in ``ctx.report``;
the runner times every pass and lints the graph after it, so a broken rewrite fails
at the pass that made it, not somewhere in Inductor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

from quarot_fx.config import QuaRotConfig
from quarot_fx.report import Report

from .lift_params import LiftedConstants


@dataclass
class PassContext:
    gm: fx.GraphModule
    config: QuaRotConfig
    report: Report
    lifted: LiftedConstants


Pass = Callable[[PassContext], None]


def unsupported_options(config: QuaRotConfig) -> list[str]:
    """Options this version accepts but cannot honour yet: refused, never silently ignored."""
    missing = []
    if config.rotates:
        missing.append(f"rotation={config.rotation!r} (use rotation='none' for now)")
    if config.quantizes:
        missing.append(
            f"w_bits={config.w_bits}, a_bits={config.a_bits}, kv_bits={config.kv_bits} "
            "(use preset='fp' for now)"
        )
    return missing


def passes_for(config: QuaRotConfig) -> list[Pass]:
    """The passes a config asks for, in order."""
    missing = unsupported_options(config)
    if missing:
        raise NotImplementedError(
            "quarot-fx cannot yet honour these options: " + "; ".join(missing)
        )
    return []


def run_passes(ctx: PassContext, passes: list[Pass]) -> None:
    for pass_fn in passes:
        start = time.perf_counter()
        pass_fn(ctx)
        ctx.gm.graph.lint()
        ctx.gm.recompile()
        ctx.report.seconds[pass_fn.__name__] = time.perf_counter() - start
