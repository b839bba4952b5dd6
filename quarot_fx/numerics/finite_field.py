"""The finite field GF(p^k), only as far as Paley's Hadamard constructions need it.

Paley needs the quadratic character of every difference of two field elements, so
the field is held as tables over integer-coded elements: element ``e`` has the
base-``p`` digits of ``e`` as its polynomial coefficients (lowest degree first).
Irreducibility and polynomial products come from sympy's GF(p) tools.
"""

from __future__ import annotations

import itertools
from functools import cached_property, lru_cache

import numpy as np
import sympy
from sympy.polys.domains import ZZ
from sympy.polys.galoistools import gf_irreducible_p, gf_mul, gf_rem


def prime_power(q: int) -> tuple[int, int] | None:
    """Return ``(p, k)`` with ``q == p**k`` and ``p`` prime, or None."""
    if q < 2:
        return None
    if sympy.isprime(q):
        return q, 1
    pk = sympy.perfect_power(q)
    if not pk:
        return None
    base, exp = pk
    # perfect_power may return a composite base (e.g. 64 -> (8, 2)); factor it fully.
    factors = sympy.factorint(base)
    if len(factors) != 1:
        return None
    (p, e), = factors.items()
    return p, e * exp


class FiniteField:
    """GF(q) for a prime power q, elements coded as integers 0..q-1 (0 is zero)."""

    def __init__(self, q: int):
        pk = prime_power(q)
        if pk is None:
            raise ValueError(f"GF({q}) does not exist: {q} is not a prime power")
        self.q = q
        self.p, self.k = pk
        self.modulus = self._first_irreducible()

    def _first_irreducible(self) -> list[int]:
        """The lexicographically first monic irreducible of degree k (deterministic)."""
        p, k = self.p, self.k
        if k == 1:
            return [1, 0]
        for tail in itertools.product(range(p), repeat=k):
            poly = [1, *tail]  # sympy order: highest degree first
            if gf_irreducible_p(poly, p, ZZ):
                return poly
        raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")

    @cached_property
    def digits(self) -> np.ndarray:
        """``digits[e, i]`` is the coefficient of x^i in element e."""
        e = np.arange(self.q)
        return np.stack([(e // self.p**i) % self.p for i in range(self.k)], axis=1)

    def _encode(self, digits: np.ndarray) -> np.ndarray:
        weights = self.p ** np.arange(self.k)
        return (digits % self.p) @ weights

    def sub_table(self) -> np.ndarray:
        """``table[a, b]`` codes ``a - b`` (addition in GF(p^k) is digit-wise mod p)."""
        d = self.digits
        return self._encode(d[:, None, :] - d[None, :, :])

    def mul(self, a: int, b: int) -> int:
        pa = [int(c) for c in self.digits[a][::-1]]
        pb = [int(c) for c in self.digits[b][::-1]]
        prod = gf_rem(gf_mul(pa, pb, self.p, ZZ), self.modulus, self.p, ZZ)
        coeffs = [0] * (self.k - len(prod)) + [int(c) for c in prod]
        return int(self._encode(np.array(coeffs[::-1])))

    def quadratic_character(self) -> np.ndarray:
        """chi[e] = 0 for e = 0, 1 if e is a nonzero square, -1 otherwise."""
        chi = -np.ones(self.q, dtype=np.int64)
        chi[0] = 0
        for e in range(1, self.q):
            chi[self.mul(e, e)] = 1
        return chi


@lru_cache(maxsize=None)
def jacobsthal_matrix(q: int) -> np.ndarray:
    """``Q[a, b] = chi(a - b)`` over GF(q): the core of both Paley constructions."""
    field = FiniteField(q)
    return field.quadratic_character()[field.sub_table()]
