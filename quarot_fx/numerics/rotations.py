"""Orthogonal rotations, and the registry R1–R4 choose them from: every matrix here is orthonormal.

* ``hadamard``: H_n/√n (QuaRot).
* ``randomized_hadamard``: diag(±1)·H_n/√n with seeded signs (QuaRot's R1).
* ``gsr``: block-diagonal sequency-ordered Walsh blocks (GSR), training-free.
* ``random``: a seeded Haar-random orthogonal matrix (the SpinQuant/QuaRot baseline).

A new kind is one call: ``register_rotation("name", build)`` with ``build(n, seed=0, group=None)``
returning an orthonormal float64 [n, n] matrix; the options ``rotation``, ``r2_rotation``,
``r3_rotation`` and ``r4_rotation`` then accept it.
"""

from __future__ import annotations

import math

import torch

from collections.abc import Callable
from dataclasses import dataclass

from .hadamard import factor_matrix, hadamard_matrix, is_hadamard_order, is_power_of_two, next_hadamard_order


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


GSR_PERMUTATIONS = ("sequency", "none")


def gsr_rotation(n: int, group_size: int | None = None, dtype: torch.dtype = torch.float32,
                 permutation: str = "sequency") -> torch.Tensor:
    """Block-diagonal of normalized Walsh matrices of order ``group_size`` (GSR).

    ``permutation="none"`` keeps Sylvester order: plain block Hadamard, the baseline GSR is
    measured against. There is no "side" to choose: the Walsh matrix is symmetric, and since
    Gray code and bit reversal are linear over GF(2), it equals the Sylvester matrix with its
    columns permuted. So GSR is block Hadamard with the rotated coordinates reordered inside
    each block: per-group RTN with blocks inside groups cannot see it (a test shows it); only
    GPTQ's column order and blocks wider than a group can.
    """
    group = group_size or default_gsr_group(n)
    if not is_power_of_two(group) or n % group:
        raise ValueError(
            f"gsr_group_size must be a power of two that divides the dimension {n}, got {group}"
        )
    if permutation not in GSR_PERMUTATIONS:
        raise ValueError(f"gsr_permutation must be one of {', '.join(map(repr, GSR_PERMUTATIONS))}; got {permutation!r}")
    walsh = walsh_matrix(group, torch.float64) if permutation == "sequency" else factor_matrix(group, torch.float64)
    block = walsh / math.sqrt(group)
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


@dataclass(frozen=True)
class RotationKind:
    """A registered rotation kind.

    ``build(n, seed=0, group=None)``: the orthonormal float64 [n, n] matrix (kinds with
    variants, like GSR's permutation side, also take ``variant=``). ``problem(n, group)``:
    why order n cannot be built (None when it can). ``fast(x, n, seed, group)``: x·Q without
    forming Q, for weight folding (optional). ``pad_to(n)``: a larger order to zero-pad to when n
    has none (dimension expansion; optional). ``hadamard_op``: the online transform is
    ``quarot_fx::hadamard_transform``, which the integer kernels fuse with quantization; other
    kinds run online as a dense matmul.
    """

    name: str
    build: Callable[..., torch.Tensor]
    problem: Callable[[int, int | None], str | None] = lambda n, group: None
    fast: Callable[..., torch.Tensor] | None = None
    pad_to: Callable[[int], int] | None = None
    hadamard_op: bool = False


ROTATION_KINDS: dict[str, RotationKind] = {}


def register_rotation(name: str, build: Callable[..., torch.Tensor], *, problem=None, fast=None, pad_to=None,
                      hadamard_op: bool = False) -> RotationKind:
    """Make ``name`` a rotation kind every rotation option accepts (re-registering replaces it)."""
    if not isinstance(name, str) or not name or name == "none":
        raise ValueError(f"a rotation kind needs a name other than 'none'; got {name!r}")
    kind = RotationKind(name, build, problem or (lambda n, group: None), fast, pad_to, hadamard_op)
    ROTATION_KINDS[name] = kind
    return kind


def rotation_kinds() -> tuple[str, ...]:
    """Registered kinds, then ``"none"`` (what the ``rotation`` option accepts)."""
    return (*ROTATION_KINDS, "none")


def rotation_kind(name: str) -> RotationKind:
    if name not in ROTATION_KINDS:
        raise ValueError(f"rotation must be one of {', '.join(map(repr, rotation_kinds()))}; got {name!r}")
    return ROTATION_KINDS[name]


def padded_order(kind: str, n: int, group: int | None = None) -> int | None:
    """n if the kind builds order n, else the order it zero-pads n to (None: it cannot)."""
    spec = rotation_kind(kind)
    if spec.problem(n, group) is None:
        return n
    return spec.pad_to(n) if spec.pad_to else None


def rotation_matrix(
    kind: str, n: int, *, seed: int = 0, group_size: int | None = None, dtype: torch.dtype = torch.float32,
    variant: str | None = None,
) -> torch.Tensor:
    """Orthonormal rotation of order n of a registered kind (``"none"``: the identity)."""
    if kind == "none":
        return torch.eye(n, dtype=dtype)
    matrix = rotation_kind(kind).build(n, seed=seed, group=group_size, **({"variant": variant} if variant else {}))
    if tuple(matrix.shape) != (n, n):
        raise ValueError(f"rotation kind {kind!r} built a {tuple(matrix.shape)} matrix for order {n}")
    return matrix.to(dtype).contiguous()  # e.g. QR's Q is column-major


def _hadamard_problem(n: int, group: int | None) -> str | None:
    return None if is_hadamard_order(n) else f"no Hadamard matrix of order {n}"


def _gsr_problem(n: int, group: int | None) -> str | None:
    g = group or default_gsr_group(n)
    return None if g >= 2 and is_power_of_two(g) and n % g == 0 else \
        f"gsr_group_size {g} must be a power of two ≥ 2 dividing {n}"


def _fast_hadamard(x, n, seed=0, group=None):
    from ..kernels.hadamard_transform import hadamard_transform_cpu

    return hadamard_transform_cpu(x)


def _fast_randomized_hadamard(x, n, seed=0, group=None):
    from ..kernels.hadamard_transform import hadamard_transform_cpu

    return hadamard_transform_cpu(x * random_signs(n, seed).to(x))  # (x ⊙ s)·H/√n = x·diag(s)·H/√n


register_rotation("hadamard", lambda n, seed=0, group=None: hadamard_matrix(n, torch.float64) / math.sqrt(n),
                  problem=_hadamard_problem, fast=_fast_hadamard, pad_to=next_hadamard_order, hadamard_op=True)
register_rotation("randomized_hadamard", lambda n, seed=0, group=None: randomized_hadamard(n, seed, torch.float64),
                  problem=_hadamard_problem, fast=_fast_randomized_hadamard, pad_to=next_hadamard_order)
register_rotation("gsr", lambda n, seed=0, group=None, variant=None: gsr_rotation(n, group, torch.float64,
                                                                                    variant or "sequency"),
                  problem=_gsr_problem)
register_rotation("random", lambda n, seed=0, group=None: random_orthogonal(n, seed, torch.float64))
