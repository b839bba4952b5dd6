"""The edits a rotation or quantization pass records on a weight, and the per-site list of them.

Passes do not touch tensors: they append edits to a site (a linear, addmm or embedding node);
the :class:`~quarot_fx.passes.weight_store.WeightStore` computes each edited weight once. Each
edit is a frozen, hashable value (it is part of the cache key) with ``apply(w, b)`` on the
logical [out, in] float weight and ``describe()`` for the report. A last edit that rounds the
weight (``WeightQuantizer``) also gives the integer ``codes`` the kernels store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from quarot_fx.numerics.sparse import wanda_mask
from quarot_fx.numerics.weight_methods import weight_method

from .graph_utils import Site
from .matrices import Matrix, multiply_right


@dataclass(frozen=True)
class InputAffine:
    """The input arrives as n with x = n ⊙ scale + shift folded away: W·diag(scale), b + W·shift."""

    signature: str
    scale: torch.Tensor | None = field(compare=False, hash=False)
    shift: torch.Tensor | None = field(compare=False, hash=False)

    def apply(self, w, b):
        if self.shift is not None:
            shift = w @ self.shift.to(w)
            b = shift if b is None else b + shift
        if self.scale is not None:
            w = w * self.scale.to(w)[None, :]
        return w, b

    def describe(self) -> str:
        return "fold norm " + ("scale+shift" if self.shift is not None else "scale")


@dataclass(frozen=True)
class InputRotation:
    """The input arrives rotated, x̃ = x·M: W ← W·M. ``online``: M is applied at run time (R2's
    cross-head part, R4), not folded upstream; an export without online transforms drops it."""

    matrix: Matrix
    online: bool = False

    def apply(self, w, b):
        return multiply_right(w, self.matrix), b

    def describe(self) -> str:
        return f"input × {self.matrix.describe()}"


@dataclass(frozen=True)
class OutputTransform:
    """Output rows [start, stop) are multiplied by M on the right: W ← Mᵀ·W, b ← Mᵀ·b."""

    matrix: Matrix
    start: int
    stop: int

    def apply(self, w, b):
        # Mᵀ·W = (Wᵀ·M)ᵀ on the rows; out of place, so learned rotations can differentiate through it
        w = self._spliced(w, multiply_right(w[self.start:self.stop].T, self.matrix).T)
        if b is not None:
            b = self._spliced(b, multiply_right(b[self.start:self.stop], self.matrix))
        return w, b

    def _spliced(self, x, rows):
        if self.start == 0 and self.stop == x.shape[0]:
            return rows.contiguous()
        return torch.cat([x[:self.start], rows, x[self.stop:]])

    def describe(self) -> str:
        whole = self.start == 0
        rows = "" if whole else f" rows {self.start}:{self.stop}"
        return f"output{rows} × {self.matrix.describe()}"


@dataclass(frozen=True)
class ScaleOutputRows:
    """Output rows [start, start + len(scale)) divided by the scale (SmoothRot's producer side)."""

    signature: str
    scale: torch.Tensor = field(compare=False, hash=False)
    start: int = 0

    def apply(self, w, b):
        rows = slice(self.start, self.start + self.scale.numel())
        w = w.clone()
        w[rows] = (w[rows].double() / self.scale[:, None]).to(w.dtype)  # float64, then one rounding
        if b is not None:
            b = b.clone()
            b[rows] = (b[rows].double() / self.scale).to(b.dtype)
        return w, b

    def describe(self) -> str:
        return f"smoothrot ÷ s on rows {self.start}:{self.start + self.scale.numel()}"


@dataclass(frozen=True)
class ScaleInputColumns:
    """Input columns multiplied by the scale (SmoothRot's consumer side): W ← W·diag(s)."""

    signature: str
    scale: torch.Tensor = field(compare=False, hash=False)

    def apply(self, w, b):
        return (w.double() * self.scale[None, :]).to(w.dtype), b

    def describe(self) -> str:
        return "smoothrot × s on inputs"


@dataclass(frozen=True)
class PadOutput:
    """Zero output rows up to ``n`` (a residual writer in an expanded stream)."""

    n: int

    def apply(self, w, b):
        w = torch.nn.functional.pad(w, (0, 0, 0, self.n - w.shape[0]))
        return w, (None if b is None else torch.nn.functional.pad(b, (0, self.n - b.shape[0])))

    def describe(self) -> str:
        return f"pad output to {self.n}"


@dataclass(frozen=True)
class PadInput:
    """Zero columns up to ``n`` inputs (dimension expansion for a Hadamard of order n); ``online``:
    the padding belongs to an online rotation (R4) and goes with it."""

    n: int
    online: bool = False

    def apply(self, w, b):
        return torch.nn.functional.pad(w, (0, self.n - w.shape[1])), b

    def describe(self) -> str:
        return f"pad input to {self.n}"


class WeightQuantizer:
    """A last edit that rounds the weight: ``codes`` gives int8 codes and group scales (what
    the integer kernels store, packed); ``apply`` gives their dequantized float form."""

    def apply(self, w, b):
        from quarot_fx.numerics.quant import dequantize_weight

        return dequantize_weight(*self.codes(w)).to(w.dtype), b


@dataclass(frozen=True)
class QuantizeWeight(WeightQuantizer):
    """Last edit without calibration: ``method`` (a registered weight method that needs none;
    built in: symmetric RTN per output channel or group, clip ratio searched per row)."""

    bits: int
    group_size: int | None
    clip_search: bool
    method: str = "rtn"

    def codes(self, w):
        return weight_method(self.method).codes(w, None, None, self)

    def describe(self) -> str:
        group = f" group {self.group_size}" if self.group_size else " per channel"
        return f"{self.method} w{self.bits}{group}" + (" (clip search)" if self.clip_search else "")


@dataclass(frozen=True)
class GPTQWeight(WeightQuantizer):
    """Last edit from calibration: a registered weight method (``method``: GPTQ, OBR, or RTN after a
    Wanda mask, or one added with ``register_weight_method``), given the Hessian of the (rotated)
    inputs; keyed by the calibration data. ``sparsity`` > 0 or an N:M ``pattern`` prunes with
    Wanda's mask first (numerics/sparse.py)."""

    bits: int
    group_size: int | None
    clip_search: bool
    damp: float
    block_size: int
    act_order: bool
    calibration: str  # fingerprint of the calibration tokens
    sequential: bool = False  # Hessians from inputs of the already-quantized earlier sites
    method: str = "gptq"  # a registered weight method ("rtn" here only when pruning: the mask needs calibration)
    sparsity: float = 0.0
    pattern: str = "unstructured"
    hessian: torch.Tensor | None = field(default=None, compare=False, hash=False)
    solved: tuple | None = field(default=None, compare=False, hash=False)  # (codes, scales) already computed

    @property
    def prunes(self) -> bool:
        return self.sparsity > 0

    def codes(self, w):
        if self.solved is not None:
            return self.solved
        if self.hessian is None:
            raise RuntimeError(f"{self.method} edit has no Hessian and its result is not cached")
        keep = (wanda_mask(w, torch.diag(self.hessian).clamp(min=0).sqrt(), self.sparsity, self.pattern)
                if self.prunes else None)
        return weight_method(self.method).codes(w, self.hessian, keep, self)

    def describe(self) -> str:
        group = f" group {self.group_size}" if self.group_size else " per channel"
        pruned = ""
        if self.prunes:
            pruned = f" {self.pattern}" if self.pattern != "unstructured" else f" {self.sparsity:.0%} unstructured"
            pruned += " (Wanda mask)"
        return (f"{self.method} w{self.bits}{group}{pruned}" + (" act-order" if self.act_order else "")
                + (" sequential" if self.sequential else ""))


Edit = (InputAffine | InputRotation | OutputTransform | ScaleOutputRows | ScaleInputColumns | PadInput | PadOutput
        | QuantizeWeight | GPTQWeight)


def weight_record(fqn: str, edit: WeightQuantizer):
    """The report's record of a weight quantization (simulated until the lowering packs it)."""
    from quarot_fx.report import QuantRecord

    method = edit.method if isinstance(edit, GPTQWeight) else "rtn"
    if isinstance(edit, GPTQWeight) and edit.prunes:
        method += f" + Wanda {edit.pattern if edit.pattern != 'unstructured' else f'{edit.sparsity:.0%}'}"
    return QuantRecord(fqn, "weight", edit.bits, method, "search" if edit.clip_search else None)


@dataclass
class SiteEdits:
    site: Site
    original_weight: str = ""  # attribute of the weight before any edit (for reports)
    edits: list = field(default_factory=list)
    online: list[str] = field(default_factory=list)  # descriptions of online transforms on its input



def quantizes_last(entry: SiteEdits) -> bool:
    return bool(entry.edits) and isinstance(entry.edits[-1], WeightQuantizer)


class Pending(NamedTuple):
    """A 4-bit weight materialization left as codes for the lowering (``ctx.lowering``)."""

    entry: SiteEdits
    record: object  # the report's QuantRecord of it
