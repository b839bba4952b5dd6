import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quarot_fx.numerics.hadamard import hadamard_matrix
from quarot_fx.numerics.rotations import (
    gsr_rotation, rotation_kinds, randomized_hadamard, rotation_matrix, sequency_permutation, walsh_matrix,
)


def sign_changes(row: torch.Tensor) -> int:
    return int((row[1:] != row[:-1]).sum())


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_walsh_rows_are_in_sequency_order(n):
    w = walsh_matrix(n)
    assert [sign_changes(w[s]) for s in range(n)] == list(range(n))
    assert sorted(sequency_permutation(n)) == list(range(n))
    assert torch.equal(w @ w.T, n * torch.eye(n))


def test_walsh_needs_power_of_two():
    with pytest.raises(ValueError, match="powers of two"):
        walsh_matrix(12)


@given(n=st.sampled_from([12, 48, 64, 96, 576]), kind=st.sampled_from(rotation_kinds()), seed=st.integers(0, 5))
def test_every_rotation_is_orthonormal(n, kind, seed):
    q = rotation_matrix(kind, n, seed=seed, dtype=torch.float64)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)


def test_gsr_is_block_diagonal_walsh():
    q = gsr_rotation(576, 64, torch.float64)
    block = walsh_matrix(64, torch.float64) / 8
    assert torch.equal(q[:64, :64], block) and torch.equal(q[64:128, 64:128], block)
    assert torch.count_nonzero(q[:64, 64:]) == 0
    assert torch.equal(gsr_rotation(576, dtype=torch.float64), q)  # default group: 64 for 576


def test_gsr_rejects_group_that_does_not_divide():
    with pytest.raises(ValueError, match="gsr_group_size"):
        gsr_rotation(96, 64)


def test_seeds_are_deterministic_and_matter():
    assert torch.equal(randomized_hadamard(64, 3), randomized_hadamard(64, 3))
    assert not torch.equal(randomized_hadamard(64, 3), randomized_hadamard(64, 4))
    assert not torch.equal(rotation_matrix("random", 32, seed=1), rotation_matrix("random", 32, seed=2))
    signs = torch.diagonal(randomized_hadamard(64, 3, torch.float64) @ hadamard_matrix(64, torch.float64).T) / 8
    assert torch.equal(signs.abs(), torch.ones(64, dtype=torch.float64))


def test_unknown_rotation_names_allowed_values():
    with pytest.raises(ValueError, match="'gsr'"):
        rotation_matrix("fourier", 8)
