"""Passes register themselves with a place in the order; the pipeline is the ordered list.

As in Inductor's ``fx_passes``, a pass is a plain function over the shared context (the graph
``ctx.gm``, the analysis ``ctx.analysis``, the config, the report). It names its stage and,
optionally, a pass it must run after or before, plus a condition on the config::

    @register_pass("rotation", after="rotate_residual", when=lambda config: config.rotates)
    def my_pass(ctx): ...

Stages run in the order of :data:`STAGES`; inside a stage, passes run in registration order
unless ``after``/``before`` place them. ``quarot_fx.explain`` prints the resulting list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from quarot_fx.config import QuaRotConfig

from .context import PassContext

STAGES = ("analysis", "rotation", "weights", "activations", "materialize", "lower")

Pass = Callable[[PassContext], None]


@dataclass(frozen=True)
class RegisteredPass:
    fn: Pass
    name: str
    stage: str
    when: Callable[[QuaRotConfig], bool]
    after: str | None = None
    before: str | None = None


PASSES: list[RegisteredPass] = []


def register_pass(stage: str, *, when: Callable[[QuaRotConfig], bool] = lambda config: True,
                  after: str | None = None, before: str | None = None, name: str | None = None):
    """Decorator: add a pass to the pipeline (re-registering a name replaces it)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(map(repr, STAGES))}; got {stage!r}")

    def add(fn: Pass) -> Pass:
        entry = RegisteredPass(fn, name or fn.__name__, stage, when, after, before)
        known = {p.name for p in PASSES}
        for anchor in (after, before):
            if anchor is not None and anchor not in known:
                raise ValueError(f"pass {entry.name!r}: no registered pass named {anchor!r} to run after/before")
        PASSES[:] = [p for p in PASSES if p.name != entry.name]
        PASSES.append(entry)
        return fn

    return add


def unregister_pass(name: str) -> None:
    PASSES[:] = [p for p in PASSES if p.name != name]


def ordered_passes(config: QuaRotConfig) -> list[RegisteredPass]:
    """The passes a config runs, in order: by stage, then registration, with after/before applied."""
    order: list[RegisteredPass] = []
    for stage in STAGES:
        for entry in [p for p in PASSES if p.stage == stage]:
            if entry.after is not None:
                anchor = next((i for i, p in enumerate(order) if p.name == entry.after), len(order) - 1)
                order.insert(anchor + 1, entry)
            elif entry.before is not None:
                anchor = next((i for i, p in enumerate(order) if p.name == entry.before), len(order))
                order.insert(anchor, entry)
            else:
                order.append(entry)
    return [p for p in order if p.when(config)]
