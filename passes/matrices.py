"""Descriptions of the matrices the passes fold into weights: hashable keys, built on demand.

A pass says *which* matrix (``Rotation("hadamard", 576)``, ``BlockRotation("hadamard", 9, 64)``,
...), of any registered rotation kind; the weight cache builds it once, in float64, when a
weight first needs it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from quarot_fx.numerics.rotations import rotation_kind, rotation_matrix


@dataclass(frozen=True)
class Rotation:
    """A rotation of order n of a registered kind (R1 on the residual, R3, R4; R2's full online part)."""

    kind: str
    n: int
    seed: int = 0
    group: int | None = None
    variant: str | None = None  # e.g. GSR's permutation side

    def describe(self) -> str:
        extra = f", group {self.group}" if self.kind == "gsr" and self.group else ""
        extra += f", {self.variant}" if self.variant else ""
        return f"{self.kind}({self.n}{extra})"


@dataclass(frozen=True)
class BlockRotation:
    """blockdiag(Q_size, … ``blocks`` times): the per-head rotation (R2, offline part)."""

    kind: str
    blocks: int
    size: int
    seed: int = 0

    def describe(self) -> str:
        return f"per-head {self.kind}({self.blocks}×{self.size})"


@dataclass(frozen=True)
class CrossHead:
    """Q_heads ⊗ I_size: the online cross-head part of R2."""

    kind: str
    heads: int
    size: int
    seed: int = 0

    def describe(self) -> str:
        return f"cross-head {self.kind}({self.heads}) ⊗ I({self.size})"


@dataclass(frozen=True)
class Center:
    """I − 11ᵀ/n: removes the mean of a vector (turns LayerNorm into RMSNorm)."""

    n: int

    def describe(self) -> str:
        return f"mean-centering({self.n})"


@dataclass(frozen=True)
class Learned:
    """A rotation learned on calibration text (``learn_rotations``): blockdiag(R, … ``blocks`` times),
    R of order ``size``. Keyed by ``digest`` (of R's bytes), so weights cached for one learned R are
    never taken for another; ``tensor`` is R itself (float64; during learning a live float32 copy
    with its gradient, digest ``"live"``)."""

    name: str  # "R1 …" or "R2 …": which rotation it replaces
    blocks: int
    size: int
    digest: str
    tensor: torch.Tensor = field(compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, name: str, blocks: int, tensor: torch.Tensor) -> "Learned":
        data = tensor.detach().to(torch.float64).contiguous()
        return cls(name, blocks, data.shape[0], hashlib.sha1(data.numpy().tobytes()).hexdigest()[:16], data)

    def describe(self) -> str:
        per_head = f"per-head ({self.blocks}×{self.size})" if self.blocks > 1 else f"({self.size})"
        return f"learned {self.name.split()[0]} {per_head}"


Matrix = Rotation | BlockRotation | CrossHead | Center | Learned


@lru_cache(maxsize=64)
def build(matrix: Matrix) -> torch.Tensor:
    """The float64 matrix a description stands for (cached: R1 is shared by every layer)."""
    f64 = torch.float64
    if isinstance(matrix, Rotation):
        return rotation_matrix(matrix.kind, matrix.n, seed=matrix.seed, group_size=matrix.group, dtype=f64,
                               variant=matrix.variant)
    if isinstance(matrix, BlockRotation):
        block = rotation_matrix(matrix.kind, matrix.size, seed=matrix.seed, dtype=f64)
        return torch.block_diag(*[block] * matrix.blocks)
    if isinstance(matrix, CrossHead):
        heads = rotation_matrix(matrix.kind, matrix.heads, seed=matrix.seed, dtype=f64)
        return torch.kron(heads, torch.eye(matrix.size, dtype=f64))
    if isinstance(matrix, Center):
        return torch.eye(matrix.n, dtype=f64) - 1.0 / matrix.n
    if isinstance(matrix, Learned):
        return torch.block_diag(*[matrix.tensor.to(f64)] * matrix.blocks)
    raise TypeError(f"unknown matrix description {matrix!r}")


def multiply_right(x: torch.Tensor, matrix: Matrix) -> torch.Tensor:
    """x·M without forming M where the kind has a fast form (Hadamard-based: n·Σfactors, not n²)."""
    from quarot_fx.kernels.hadamard_transform import hadamard_transform_cpu

    if isinstance(matrix, Center):
        return x - x.mean(dim=-1, keepdim=True)
    if isinstance(matrix, Learned):  # differentiable in the live tensor while learning
        blocks = x.reshape(*x.shape[:-1], matrix.blocks, matrix.size)
        return (blocks @ matrix.tensor.to(x.dtype)).reshape(x.shape)
    kind = rotation_kind(matrix.kind) if matrix.kind != "none" else None
    if isinstance(matrix, Rotation) and kind is not None and kind.fast is not None:
        return kind.fast(x, matrix.n, matrix.seed, matrix.group)
    if isinstance(matrix, BlockRotation) and kind is not None and kind.fast is not None:
        blocks = x.reshape(*x.shape[:-1], matrix.blocks, matrix.size)
        return kind.fast(blocks, matrix.size, matrix.seed, None).reshape(x.shape)
    if isinstance(matrix, CrossHead) and kind is not None and kind.hadamard_op:
        return hadamard_transform_cpu(x, matrix.size)
    return x @ build(matrix).to(x)
