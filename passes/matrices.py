"""Descriptions of the matrices the passes fold into weights: hashable keys, built on demand.

A pass says *which* matrix (``Hadamard(576)``, ``BlockHadamard(9, 64)``, ...); the weight
cache builds it once, in float64, when a weight first needs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from quarot_fx.hadamard import hadamard_matrix
from quarot_fx.rotations import random_signs, rotation_matrix


@dataclass(frozen=True)
class Rotation:
    """The residual-stream rotation R1 of a given kind."""

    kind: str
    n: int
    seed: int = 0
    group: int | None = None

    def describe(self) -> str:
        extra = f", group {self.group}" if self.kind == "gsr" and self.group else ""
        return f"{self.kind}({self.n}{extra})"


@dataclass(frozen=True)
class Hadamard:
    """H_n/√n: the full Hadamard rotation (R4, and R2's online part when heads have no H)."""

    n: int

    def describe(self) -> str:
        return f"hadamard({self.n})"


@dataclass(frozen=True)
class BlockHadamard:
    """blockdiag(H_size/√size, … ``blocks`` times): per-head rotation (R2, offline part)."""

    blocks: int
    size: int

    def describe(self) -> str:
        return f"per-head hadamard({self.blocks}×{self.size})"


@dataclass(frozen=True)
class CrossHead:
    """(H_heads/√heads) ⊗ I_size: the online cross-head part of R2."""

    heads: int
    size: int

    def describe(self) -> str:
        return f"cross-head hadamard({self.heads}) ⊗ I({self.size})"


@dataclass(frozen=True)
class Center:
    """I − 11ᵀ/n: removes the mean of a vector (turns LayerNorm into RMSNorm)."""

    n: int

    def describe(self) -> str:
        return f"mean-centering({self.n})"


Matrix = Rotation | Hadamard | BlockHadamard | CrossHead | Center


@lru_cache(maxsize=64)
def build(matrix: Matrix) -> torch.Tensor:
    """The float64 matrix a description stands for (cached: R1 is shared by every layer)."""
    f64 = torch.float64
    if isinstance(matrix, Rotation):
        return rotation_matrix(matrix.kind, matrix.n, seed=matrix.seed, group_size=matrix.group, dtype=f64)
    if isinstance(matrix, Hadamard):
        return hadamard_matrix(matrix.n, f64) / math.sqrt(matrix.n)
    if isinstance(matrix, BlockHadamard):
        block = hadamard_matrix(matrix.size, f64) / math.sqrt(matrix.size)
        return torch.block_diag(*[block] * matrix.blocks)
    if isinstance(matrix, CrossHead):
        return torch.kron(hadamard_matrix(matrix.heads, f64) / math.sqrt(matrix.heads), torch.eye(matrix.size, dtype=f64))
    if isinstance(matrix, Center):
        return torch.eye(matrix.n, dtype=f64) - 1.0 / matrix.n
    raise TypeError(f"unknown matrix description {matrix!r}")


def multiply_right(x: torch.Tensor, matrix: Matrix) -> torch.Tensor:
    """x·M without forming M where it has a fast form (Hadamard-based: n·Σfactors, not n²)."""
    from quarot_fx.kernels.hadamard_transform import hadamard_transform_cpu

    if isinstance(matrix, Hadamard) or (isinstance(matrix, Rotation) and matrix.kind == "hadamard"):
        return hadamard_transform_cpu(x)
    if isinstance(matrix, Rotation) and matrix.kind == "randomized_hadamard":
        return hadamard_transform_cpu(x * random_signs(matrix.n, matrix.seed).to(x))
    if isinstance(matrix, BlockHadamard):
        return hadamard_transform_cpu(x.reshape(*x.shape[:-1], matrix.blocks, matrix.size)).reshape(x.shape)
    if isinstance(matrix, CrossHead):
        return hadamard_transform_cpu(x, matrix.size)
    if isinstance(matrix, Center):
        return x - x.mean(dim=-1, keepdim=True)
    return x @ build(matrix).to(x)
