"""Orthogonal rotations the passes fold into weights: every matrix here is orthonormal.

* ``hadamard``: H_n/√n (QuaRot).
* ``randomized_hadamard``: diag(±1)·H_n/√n with seeded signs (QuaRot's R1).
* ``gsr``: block-diagonal sequency-ordered Walsh blocks (GSR), training-free.
* ``random``: a seeded Haar-random orthogonal matrix (the SpinQuant/QuaRot baseline).
"""

from __future__ import annotations

import math

import torch

from .hadamard import factor_matrix, hadamard_matrix, is_power_of_two

ROTATIONS = ("hadamard", "randomized_hadamard", "gsr", "random", "none")


def _bit_reverse(value: int, bits: int) -> int:
    return int(format(value, f"0{bits}b")[::-1], 2) if bits else 0


def sequency_permutation(n: int) -> list[int]:
    """``perm[s]``: the Sylvester row with s sign changes, ``bitrev(s ^ (s >> 1))``."""
    if not is_power_of_two(n):
        raise ValueError(f"Walsh matrices exist for powers of two only, got order {n}")
    bits = n.bit_length() - 1
    return [_bit_reverse(s ^ (s >> 1), bits) for s in range(n)]


def walsh_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sequency-ordered ±1 Walsh matrix: row s changes sign exactly s times."""
    return factor_matrix(n, dtype)[sequency_permutation(n)]


def default_gsr_group(n: int) -> int:
    """Largest power of two dividing n, at most 128 (GSR's group size when none is given)."""
    return min(n & -n, 128)


def gsr_rotation(n: int, group_size: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Block-diagonal of normalized Walsh matrices of order ``group_size`` (GSR)."""
    group = group_size or default_gsr_group(n)
    if not is_power_of_two(group) or n % group:
        raise ValueError(
            f"gsr_group_size must be a power of two that divides the dimension {n}, got {group}"
        )
    block = walsh_matrix(group, torch.float64) / math.sqrt(group)
    return torch.block_diag(*[block] * (n // group)).to(dtype)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_signs(n: int, seed: int = 0) -> torch.Tensor:
    """The seeded ±1 vector s of ``randomized_hadamard`` (float64)."""
    return (torch.randint(0, 2, (n,), generator=_generator(seed), dtype=torch.int64) * 2 - 1).to(torch.float64)


def randomized_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """diag(s)·H_n/√n with s a seeded random ±1 vector."""
    h = hadamard_matrix(n, torch.float64) / math.sqrt(n)
    return (random_signs(n, seed)[:, None] * h).to(dtype)


def random_orthogonal(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Haar-random orthogonal matrix: QR of a seeded Gaussian, signs fixed by diag(R)."""
    gauss = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def rotation_matrix(
    kind: str, n: int, *, seed: int = 0, group_size: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Orthonormal rotation of order n of the given kind (one of :data:`ROTATIONS`)."""
    if kind == "hadamard":
        return (hadamard_matrix(n, torch.float64) / math.sqrt(n)).to(dtype)
    if kind == "randomized_hadamard":
        return randomized_hadamard(n, seed, dtype)
    if kind == "gsr":
        return gsr_rotation(n, group_size, dtype)
    if kind == "random":
        return random_orthogonal(n, seed, dtype)
    if kind == "none":
        return torch.eye(n, dtype=dtype)
    raise ValueError(f"rotation must be one of {', '.join(map(repr, ROTATIONS))}; got {kind!r}")
