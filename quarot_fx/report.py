"""What the compiler did to one graph, in a form people can read and tests can check.

Every compile by the backend produces a :class:`Report`; :func:`collect_reports` gathers
them (``quarot_fx.explain`` uses it), and each report is also logged at INFO level on the
``quarot_fx`` logger.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field


log = logging.getLogger("quarot_fx")


class QuaRotWarning(UserWarning):
    """Something a user asked for did not happen, or will not from now on (see the message)."""


@dataclass
class Region:
    """A set of tensors that share one rotation (e.g. the residual stream, R1)."""

    kind: str  # "R1" .. "R4"
    size: int
    rotation: str
    where: str  # human-readable location (layers, module labels)


@dataclass
class LinearReport:
    """The transforms applied to one weight-bearing op, offline (folded) and online (at run time).

    ``weight`` is the fully qualified name of the parameter the op reads (as in
    ``model.named_parameters()``); ``module`` is where the op sits, which differs from the
    weight's owner for a tied head (``lm_head`` reading ``model.embed_tokens.weight``).
    """

    module: str
    kind: str  # "linear" | "addmm" | "embedding"
    weight: str
    offline: list[str] = field(default_factory=list)
    online: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        owner = self.weight.rpartition(".")[0]
        shared = "" if owner == self.module else f", weight {self.weight} (untied)"
        return f"{self.module} ({self.kind}{shared})"


@dataclass
class Skip:
    """A part of the graph left as it was, and why: never a silent omission."""

    what: str
    why: str


@dataclass
class QuantRecord:
    """One quantization decision: what is quantized where, to how many bits, how, and stored how."""

    site: str  # a parameter's FQN (weights) or the module where the value is read (activations, KV)
    what: str  # "weight" | "activation" | "key" | "value"
    bits: int
    method: str  # "rtn", "gptq", "per-token symmetric", "asymmetric per head"
    clip: float | str | None = None  # a ratio, or "search" (weights: per-row clip search)
    storage: str = "simulated"  # "simulated" (fake quantization), "integer op", "packed int4"


@dataclass
class ChannelMax:
    """SmoothRot's effect on one down-projection input: the largest |x_j| over channels."""

    site: str
    before: float
    smoothed: float  # after dividing by SmoothRot's scales
    rotated: float | None  # after R4 alone (None: no R4 there)
    smoothed_rotated: float | None  # after smoothing, then R4: what the quantizer sees


@dataclass
class ClipRecord:
    """A clip ratio found by the GBS search for one quantized input (activation, key or value)."""

    site: str
    what: str
    clip: float


@dataclass
class Report:
    graph: str
    options: dict
    lifted_constants: int = 0
    regions: list[Region] = field(default_factory=list)
    linears: list[LinearReport] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counters: Counter = field(default_factory=Counter)  # e.g. packed_bytes, fused_hadamards, kv_tensors_quantized
    quantized: list[QuantRecord] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # pass or phase -> wall time
    pipeline: list[str] = field(default_factory=list)  # the passes that ran, in order
    channel_max: list[ChannelMax] = field(default_factory=list)  # SmoothRot, on calibration window 1
    clips: list[ClipRecord] = field(default_factory=list)  # GBS, in graph order
    input_max: dict[str, float] = field(default_factory=dict)  # observe_inputs: site → max |x| after the rewrite
    gemm: list = field(default_factory=list)  # kernels.int_gemm.Decision per CPU linear shape (rows: compiled, 1)
    graph_module: object = field(default=None, repr=False)  # the rewritten FX graph, before lowering

    def region_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(r.kind for r in self.regions).items()))

    def linear(self, module: str, kind: str, weight: str) -> LinearReport:
        for entry in self.linears:
            if (entry.module, entry.kind, entry.weight) == (module, kind, weight):
                return entry
        entry = LinearReport(module, kind, weight)
        self.linears.append(entry)
        return entry

    def warn_skips(self) -> None:
        """One Python warning per graph that left requested work undone (the report has every reason)."""
        if not self.skipped:
            return
        shown = "; ".join(f"{s.what}: {s.why}" for s in self.skipped[:3])
        more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
        warnings.warn(QuaRotWarning(f"quarot-fx left {len(self.skipped)} part(s) of the {self.graph} as they "
                                    f"were: {shown}{more} (quarot_fx.explain shows the full report)"),
                      stacklevel=3)

    def __str__(self) -> str:
        lines = [f"quarot-fx report for {self.graph}", f"  options: {self.options}",
                 f"  constants lifted: {self.lifted_constants}"]
        lines.append(f"  regions: {self.region_counts() or 'none'}")
        for r in self.regions:
            lines.append(f"    {r.kind:<3} size {r.size:<6} {r.rotation:<20} {r.where}")
        if self.linears:
            lines.append("  linears:")
            for entry in self.linears:
                offline = ", ".join(entry.offline) or "-"
                online = ", ".join(entry.online) or "-"
                lines.append(f"    {entry.name}: offline [{offline}] online [{online}]")
        lines.append(f"  skipped: {len(self.skipped) or 'nothing'}")
        for s in self.skipped:
            lines.append(f"    {s.what}: {s.why}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.counters["sparse_weights"]:
            c = self.counters
            verdict = ("pattern holds in every linear" if not c["sparse_pattern_violations"]
                       else f"PATTERN VIOLATED in {c['sparse_pattern_violations']} linear(s)")
            lines.append(f"  sparsity (stored weights): {c['sparse_zeros'] / c['sparse_weights']:.2%} zeros over "
                         f"{c['sparse_linears']} linears; {verdict}")
        if self.quantized:
            kinds = Counter(f"{r.what} {r.method} {r.bits}-bit, {r.storage}" for r in self.quantized)
            lines.append("  quantized: " + "; ".join(f"{n}× {k}" for k, n in sorted(kinds.items())))
        if self.channel_max:
            lines.append("  down-projection input, max |x| over channels (calibration window 1):")
            lines.append(f"    {'site':<34} {'before':>10} {'smoothed':>10} {'rotated':>10} {'both':>10}")
            show = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
            for row in self.channel_max:
                lines.append(f"    {row.site:<34} {row.before:>10.3g} {row.smoothed:>10.3g} "
                             f"{show(row.rotated):>10} {show(row.smoothed_rotated):>10}")
        if self.clips:
            lines.append("  clips found by GBS (site × input → clip):")
            for row in self.clips:
                lines.append(f"    {row.site:<34} {row.what:<10} {row.clip:.4f}")
        if self.gemm:
            from quarot_fx.kernels.int_gemm import cpu_flags

            lines.append(f"  integer GEMM on this CPU ({', '.join(cpu_flags()) or 'flags unknown'}), per shape:")
            for d in self.gemm:
                timed = [f"{name} {ms:.3g} ms" for name, ms in d.ms]
                timing = f" ({' vs '.join(timed)})" if d.by == "measured" else ""
                lines.append(f"    rows≤{d.rows:<4} {d.in_features}→{d.out_features} group {d.group}: "
                             f"{d.choice}, by {d.by}{timing}")
        if self.pipeline:
            lines.append("  pipeline: " + " → ".join(self.pipeline))
        lines.append("  time: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in self.seconds.items()))
        return "\n".join(lines)


_collectors: contextvars.ContextVar[tuple[list[Report], ...]] = contextvars.ContextVar(
    "quarot_fx_report_collectors", default=()
)


@contextlib.contextmanager
def collect_reports():
    """Within the block, every report the backend makes is appended to the yielded list."""
    reports: list[Report] = []
    token = _collectors.set(_collectors.get() + (reports,))
    try:
        yield reports
    finally:
        _collectors.reset(token)


def publish(report: Report) -> None:
    for sink in _collectors.get():
        sink.append(report)
    log.info("%s", report)
