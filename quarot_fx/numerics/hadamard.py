"""Exact Hadamard matrices of every order quarot-fx can construct, and their fast-transform plans.

A Hadamard matrix H of order n has entries ±1 and H·Hᵀ = n·I, so H/√n is orthogonal.
Constructions (and Kronecker products of them, since H_a ⊗ H_b is Hadamard of order a·b):

* Sylvester: order 2^k.
* Paley I:  order q + 1 for a prime power q ≡ 3 (mod 4).
* Paley II: order 2(q + 1) for a prime power q ≡ 1 (mod 4).

Among all ways of writing n as a product of such orders, :func:`hadamard_plan` picks the
one with the cheapest fast transform: the power-of-two part runs as a butterfly with
radix ≤ 64 and every other factor as a small dense matmul, so the cost per element is
the sum of the factor orders. :func:`hadamard_matrix` returns exactly the matrix that
plan's transform applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import sympy
import torch

from .finite_field import jacobsthal_matrix, prime_power

MAX_RADIX_LOG2 = 6  # butterfly stages are dense Sylvester blocks of order ≤ 64


class HadamardOrderError(ValueError):
    """No construction known here gives this order; ``nearest`` lists the next orders that work."""

    def __init__(self, n: int, nearest: list[int]):
        self.n = n
        self.nearest = nearest
        super().__init__(
            f"no Hadamard matrix of order {n} can be constructed (Sylvester 2^k, Paley I q+1, "
            f"Paley II 2(q+1), and Kronecker products). Nearest larger orders that can: "
            f"{', '.join(map(str, nearest))}. Zero-pad the dimension to one of them "
            f"(dimension expansion: quarot_fx.numerics.hadamard.next_hadamard_order({n}) == {nearest[0]})."
        )


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@lru_cache(maxsize=None)
def paley_construction(order: int) -> tuple[str, int] | None:
    """Return ``("paley1", q)`` or ``("paley2", q)`` if Paley builds ``order``, else None."""
    q = order - 1
    if q % 4 == 3 and prime_power(q):
        return "paley1", q
    if order % 2 == 0:
        q = order // 2 - 1
        if q % 4 == 1 and prime_power(q):
            return "paley2", q
    return None


def paley_matrix(kind: str, q: int) -> np.ndarray:
    """Paley I (order q+1, q ≡ 3 mod 4) or Paley II (order 2(q+1), q ≡ 1 mod 4), ±1 entries."""
    if (kind, q % 4) not in (("paley1", 3), ("paley2", 1)) or not prime_power(q):
        raise ValueError(f"{kind} needs a prime power q ≡ {3 if kind == 'paley1' else 1} (mod 4); got q={q}")
    jac = jacobsthal_matrix(q)
    ones = np.ones((q, 1), dtype=np.int64)
    zero = np.zeros((1, 1), dtype=np.int64)
    if kind == "paley1":
        # H = I + S with S = [[0, 1ᵀ], [-1, Q]] skew-symmetric (Q is, since q ≡ 3 mod 4).
        return np.block([[zero, ones.T], [-ones, jac]]) + np.eye(q + 1, dtype=np.int64)
    # Paley II: symmetric conference matrix C, then C ⊗ [[1,1],[1,-1]] + I ⊗ [[1,-1],[-1,-1]].
    c = np.block([[zero, ones.T], [ones, jac]])
    return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(
        np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]])
    )


@lru_cache(maxsize=None)
def _base_matrix(order: int) -> np.ndarray:
    """The ±1 matrix of one Kronecker factor (Sylvester for powers of two, else Paley)."""
    if is_power_of_two(order):
        h = np.ones((1, 1), dtype=np.int64)
        while h.shape[0] < order:
            h = np.block([[h, h], [h, -h]])
        return h
    construction = paley_construction(order)
    if construction is None:
        raise HadamardOrderError(order, nearest_hadamard_orders(order))
    return paley_matrix(*construction)


def _radix_split(log2n: int) -> tuple[int, ...]:
    """Split 2^log2n into as few butterfly stages (radix ≤ 64) as possible, balanced."""
    if log2n == 0:
        return ()
    stages = math.ceil(log2n / MAX_RADIX_LOG2)
    bits = [log2n // stages + (1 if i < log2n % stages else 0) for i in range(stages)]
    return tuple(2**b for b in bits)


@lru_cache(maxsize=None)
def _cheapest_dense_factors(m: int) -> tuple[int, tuple[int, ...]] | None:
    """Best (cost, factors) writing m as (Paley orders) × 2^a, or None if impossible."""
    if is_power_of_two(m):
        radix = _radix_split(m.bit_length() - 1)
        return sum(radix), ()
    best = None
    for b in sympy.divisors(m):
        if b < 12 or is_power_of_two(b) or paley_construction(b) is None:
            continue
        rest = _cheapest_dense_factors(m // b)
        if rest is None:
            continue
        cost, factors = b + rest[0], tuple(sorted((b, *rest[1]), reverse=True))
        if best is None or (cost, len(factors), factors) < (best[0], len(best[1]), best[1]):
            best = (cost, factors)
    return best


@dataclass(frozen=True)
class HadamardPlan:
    """How to build and apply H_n: Kronecker factors, the last one on the fastest axis.

    ``dense`` are Paley factors (applied as dense matmuls), ``radix`` the butterfly stages of
    the power-of-two part. ``factors = dense + radix`` and H_n = ⊗ factors.
    """

    n: int
    dense: tuple[int, ...]
    radix: tuple[int, ...]

    @property
    def factors(self) -> tuple[int, ...]:
        return self.dense + self.radix

    @property
    def cost_per_element(self) -> int:
        """Multiply-adds per transformed element (vs n for a dense matmul)."""
        return sum(self.factors)

    def describe(self) -> str:
        parts = [f"paley({d})" for d in self.dense]
        if self.radix:
            parts.append(f"sylvester({math.prod(self.radix)}) as radix-{'x'.join(map(str, self.radix))}")
        return " ⊗ ".join(parts) or "1"


@lru_cache(maxsize=None)
def hadamard_plan(n: int) -> HadamardPlan:
    """The cheapest fast-transform factorization of order n; raises HadamardOrderError if none."""
    if n < 1:
        raise ValueError(f"Hadamard order must be positive, got {n}")
    found = _cheapest_dense_factors(n)
    if found is None:
        raise HadamardOrderError(n, nearest_hadamard_orders(n))
    dense = found[1]
    power = n // math.prod(dense)
    return HadamardPlan(n, dense, _radix_split(power.bit_length() - 1))


def is_hadamard_order(n: int) -> bool:
    """True if quarot-fx can construct a Hadamard matrix of order n."""
    return n >= 1 and _cheapest_dense_factors(n) is not None


def nearest_hadamard_orders(n: int, count: int = 3) -> list[int]:
    """The ``count`` smallest constructible orders greater than n."""
    found, m = [], n
    while len(found) < count:
        m += 1
        if is_hadamard_order(m):
            found.append(m)
    return found


def next_hadamard_order(n: int) -> int:
    """Smallest constructible order ≥ n: the target of dimension expansion (zero padding)."""
    return n if is_hadamard_order(n) else nearest_hadamard_orders(n, 1)[0]


def hadamard_orders(limit: int) -> list[int]:
    """Every constructible order ≤ limit."""
    return [n for n in range(1, limit + 1) if is_hadamard_order(n)]


def factor_matrix(order: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ±1 matrix of one Kronecker factor of a plan."""
    return torch.from_numpy(_base_matrix(order)).to(dtype)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An exact ±1 matrix H of order n with H·Hᵀ = n·I (not normalized).

    It is the matrix the fast transform of :func:`hadamard_plan(n)` applies, so dense and
    fast paths agree. Raises :class:`HadamardOrderError` naming the nearest buildable orders.
    """
    plan = hadamard_plan(n)
    h = np.ones((1, 1), dtype=np.int64)
    for order in plan.dense:
        h = np.kron(h, _base_matrix(order))
    # The product of the radix stages is one Sylvester matrix.
    h = np.kron(h, _base_matrix(math.prod(plan.radix)))
    return torch.from_numpy(h).to(dtype)
