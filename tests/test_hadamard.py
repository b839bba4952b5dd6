import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quarot_fx.numerics.finite_field import FiniteField, jacobsthal_matrix, prime_power
from quarot_fx.numerics.hadamard import (
    HadamardOrderError, factor_matrix, hadamard_matrix, hadamard_orders, hadamard_plan,
    is_hadamard_order, nearest_hadamard_orders, next_hadamard_order, paley_construction, paley_matrix,
)

REQUIRED = [12, 20, 28, 36, 40, 44, 52, 60, 68, 76, 108, 148, 344, 576, 1536, 2048,
            3072, 3584, 4096, 4864, 11008, 13824, 14336, 18944]
ORDERS_UP_TO_2048 = hadamard_orders(2048)


def assert_hadamard(h: torch.Tensor) -> None:
    """Exact: entries are ±1 and every entry of H·Hᵀ is an integer below 2^53 in float64."""
    n = h.shape[0]
    h = h.to(torch.float64)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@given(st.sampled_from(ORDERS_UP_TO_2048))
def test_every_constructible_order_up_to_2048_is_exactly_hadamard(n):
    assert_hadamard(hadamard_matrix(n))


def test_orders_list_is_substantial_and_includes_non_powers_of_two():
    assert len(ORDERS_UP_TO_2048) > 300
    assert {12, 20, 28, 36, 100, 344, 576, 1536} <= set(ORDERS_UP_TO_2048)


@pytest.mark.parametrize("n", REQUIRED)
def test_required_sizes_have_plans_whose_factors_are_hadamard(n):
    plan = hadamard_plan(n)
    assert math.prod(plan.factors) == n
    for order in set(plan.factors):  # Kronecker products of Hadamard matrices are Hadamard
        assert_hadamard(factor_matrix(order))
    assert plan.cost_per_element <= n


@pytest.mark.parametrize("n", [3072, 3584, 4096])
def test_large_required_sizes_build_dense(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n)
    picked = torch.arange(0, n, n // 16)  # rows · Hᵀ for a subset of rows, exactly
    gram = h[picked].to(torch.float64) @ h.to(torch.float64).T
    assert torch.equal(gram, n * torch.eye(n, dtype=torch.float64)[picked])


@pytest.mark.parametrize("q", [11, 19, 23, 27, 43, 343])
def test_paley_one_over_prime_powers(q):
    assert paley_construction(q + 1) == ("paley1", q)
    assert_hadamard(factor_matrix(q + 1))


@pytest.mark.parametrize("q", [5, 9, 13, 17, 25, 37, 49, 73, 81, 125])
def test_paley_two_over_prime_powers(q):
    assert_hadamard(torch.from_numpy(paley_matrix("paley2", q)))


def test_paley_rejects_wrong_q():
    with pytest.raises(ValueError, match="prime power"):
        paley_matrix("paley1", 15)
    with pytest.raises(ValueError, match="mod 4"):
        paley_matrix("paley2", 7)


def test_cheapest_factorization_prefers_small_dense_factors():
    assert hadamard_plan(576).dense == (12, 12)  # 12+12+4 multiply-adds beat 36+16
    assert hadamard_plan(4096).dense == ()
    assert all(r <= 64 for r in hadamard_plan(4096).radix)
    assert hadamard_plan(11008).dense == (344,)


@pytest.mark.parametrize("n,nearest", [(9, [12, 16, 20]), (92, [96, 100, 104]), (668, [672, 676, 680])])
def test_unbuildable_order_names_nearest_larger_orders(n, nearest):
    with pytest.raises(HadamardOrderError) as err:
        hadamard_matrix(n)
    assert err.value.nearest == nearest
    assert str(nearest[0]) in str(err.value) and "pad" in str(err.value)
    assert next_hadamard_order(n) == nearest[0]
    assert not is_hadamard_order(n)


def test_next_order_of_buildable_size_is_itself():
    assert next_hadamard_order(576) == 576
    assert nearest_hadamard_orders(576, 2) == [580, 588]  # 2(17²+1), 2(293+1)


@pytest.mark.parametrize("q", [2, 3, 4, 8, 9, 25, 27, 49, 343])
def test_finite_field_is_a_field(q):
    field = FiniteField(q)
    for a in range(1, q, max(1, q // 20)):
        assert any(field.mul(a, b) == 1 for b in range(1, q)), f"{a} has no inverse in GF({q})"
    if q % 2:
        chi = field.quadratic_character()
        assert (chi == 1).sum() == (q - 1) // 2 and (chi == -1).sum() == (q - 1) // 2


def test_jacobsthal_symmetry_follows_q_mod_4():
    assert np.array_equal(jacobsthal_matrix(27), -jacobsthal_matrix(27).T)
    assert np.array_equal(jacobsthal_matrix(25), jacobsthal_matrix(25).T)


def test_prime_power_detection():
    assert prime_power(343) == (7, 3) and prime_power(64) == (2, 6) and prime_power(7) == (7, 1)
    assert prime_power(75) is None and prime_power(1) is None
