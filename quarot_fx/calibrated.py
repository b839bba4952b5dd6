"""What calibration produced, and the identity of the data it ran on: the one record that
``config`` (the ``calibrated=`` option), the passes (which fill it), the report (which carries it)
and ``artifact`` (which saves and loads it) share. It depends on nothing but torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


def fingerprint(calibration) -> str:
    """A short hash of calibration token ids: results computed from them are keyed by it."""
    digest = hashlib.sha1()
    for tokens in calibration:
        digest.update(tokens.detach().cpu().to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


class ArtifactError(ValueError):
    """A saved artifact that cannot be loaded as it is (never a silently different model)."""


@dataclass
class Calibrated:
    """What calibration produced, keyed by parameter name (stable across processes)."""

    fingerprint: str | None = None  # of the calibration tokens
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # fqn → (codes, scales)
    channel_max: dict[str, torch.Tensor] = field(default_factory=dict)  # down-projection weight fqn → max |x_j|
    clips: dict[tuple[str, str], float] = field(default_factory=dict)  # (site, what) → clip
    rotations: dict[str, torch.Tensor] = field(default_factory=dict)  # "R1 …"/"R2 …" → learned float64 matrix

    def __str__(self) -> str:
        return (f"{len(self.weights)} calibrated weights, {len(self.channel_max)} SmoothRot sites, "
                f"{len(self.clips)} clips" + (f", {len(self.rotations)} learned rotations" if self.rotations else ""))

    def merge(self, other: Calibrated) -> None:
        if other.fingerprint is not None:
            if self.fingerprint not in (None, other.fingerprint):
                raise ArtifactError("the compiled graphs were calibrated on different data")
            self.fingerprint = other.fingerprint
        self.weights.update(other.weights)
        self.channel_max.update(other.channel_max)
        self.clips.update(other.clips)
        self.rotations.update(other.rotations)

    def get(self, table: str, key):
        found = getattr(self, table).get(key)
        if found is None:
            raise ArtifactError(f"the loaded artifact has no {table.replace('_', ' ')} for {key!r}: it was saved "
                                "from another model or with other options")
        return found
