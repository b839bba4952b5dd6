"""What one build of a graph produced that ``save`` and ``export`` need, apart from the report.

The :class:`~quarot_fx.report.Report` is diagnostics (what was found, done and skipped, and why);
a :class:`CompiledArtifact` is data: calibration's products (what ``save`` writes), each
weight-bearing op's final constants, the norms whose scales were folded away, and the rotations
left online (what ``export`` writes). The passes fill ``ctx.artifact``; the backend keeps it with
the build, where ``save`` and ``export`` find it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .calibrated import Calibrated


@dataclass
class FinalWeight:
    """A weight-bearing op's constants as the compiled graph holds them, by the module that reads
    them: what ``quarot_fx.export`` writes. ``codes`` (quantized sites) is deferred: a call gives
    (int8 codes [out, in], float32 scales [out, groups]) without the compile paying for them."""

    module: str
    kind: str  # "linear" | "addmm" | "embedding"
    weight_fqn: str  # the parameter it was computed from (tied heads read the embedding's)
    param: object = field(default=None, repr=False)  # that parameter: names are relative to the compiled frame
    weight: object = field(default=None, repr=False)  # float tensor in the op's stored layout; None when held as codes only
    bias: object = None
    bits: int | None = None
    group_size: int | None = None
    codes: object = None  # callable → (codes, scales)
    offline_codes: object = None  # callable → (codes, scales) quantized without the online input rotations, if derivable


@dataclass
class OnlineRotation:
    """A rotation applied at run time (R2's cross-head part, R3, R4), for export to describe."""

    region: str  # "R2" | "R3" | "R4"
    where: str  # the module whose input (R2, R4) or attention (R3) it rotates
    matrix: object  # a passes.matrices description (Rotation, CrossHead)
    width: int  # the input width before zero-padding


@dataclass
class CompiledArtifact:
    calibrated: Calibrated = field(default_factory=Calibrated)  # what quarot_fx.save writes
    final_weights: dict[str, FinalWeight] = field(default_factory=dict, repr=False)  # module → constants
    folded_norms: dict[str, tuple] = field(default_factory=dict, repr=False)  # norm FQN → ("ones" or why not, parameter)
    online: list[OnlineRotation] = field(default_factory=list)  # R2's online part, R3, R4
    expanded_dims: int = 0  # residual dimensions added by expansion (no model class holds them)
    explicit_inverses: int = 0  # inverse rotations R1 needed at run time (no model class has a place for them)
