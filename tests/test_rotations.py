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


def test_gsr_is_block_hadamard_with_columns_permuted_inside_blocks():
    """The Walsh matrix is symmetric (no side to choose) and, Gray code and bit reversal being
    linear over GF(2), equals the Sylvester matrix with permuted columns."""
    from quarot_fx.numerics.hadamard import factor_matrix

    sylvester = factor_matrix(16, torch.float64) / 4
    walsh, plain = (gsr_rotation(32, 16, torch.float64, p) for p in ("sequency", "none"))
    assert torch.equal(plain, torch.block_diag(sylvester, sylvester))
    assert torch.equal(walsh, walsh.T)
    columns = [next(j for j in range(32) if torch.equal(walsh[:, k], plain[:, j])) for k in range(32)]
    assert sorted(columns[:16]) == list(range(16)) and columns != list(range(32))  # inside each block
    with pytest.raises(ValueError, match="gsr_permutation must be one of 'sequency', 'none'"):
        gsr_rotation(32, 16, torch.float64, "columns")


@pytest.mark.parametrize("clip_search", [False, True])
def test_per_group_rtn_cannot_see_a_permutation_inside_its_group(clip_search):
    """GSR's pitfall (METHODS.md): with Walsh blocks inside quantization groups, per-group RTN
    of GSR-rotated weights is block Hadamard's with columns permuted, so the layer's output is
    identical; with blocks wider than a group it is a different quantization."""
    from quarot_fx.numerics.quant import dequantize_weight, weight_codes_rtn

    torch.manual_seed(0)
    n, block = 128, 32
    w = torch.randn(24, n, dtype=torch.float64)
    w[:, 5] *= 30  # an outlier column
    x = torch.randn(10, n, dtype=torch.float64)

    def rtn_output(rotation, group_size):
        q = dequantize_weight(*weight_codes_rtn((w @ rotation).float(), 3, group_size, clip_search)).double()
        return (x @ rotation) @ q.T

    walsh, plain = (gsr_rotation(n, block, torch.float64, p) for p in ("sequency", "none"))
    for group in (block, 2 * block):  # blocks inside groups
        torch.testing.assert_close(rtn_output(walsh, group), rtn_output(plain, group), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(rtn_output(walsh, block // 2), rtn_output(plain, block // 2), rtol=1e-3)
