"""The fast transform op against a dense reference, on CPU and (interpreted) Triton."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quarot_fx.numerics.hadamard import hadamard_orders
from quarot_fx.kernels import hadamard_transform, hadamard_transform_reference

ORDERS = [n for n in hadamard_orders(1024) if n > 1]


@given(n=st.sampled_from(ORDERS), rows=st.integers(1, 5), seed=st.integers(0, 100))
def test_cpu_transform_equals_dense_matmul(n, rows, seed):
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x), hadamard_transform_reference(x), rtol=0, atol=1e-10)


@given(n=st.sampled_from(ORDERS), inner=st.sampled_from([1, 3]), seed=st.integers(0, 100))
def test_gradient_equals_the_dense_reference(n, inner, seed):
    """Paley factors are not symmetric: the backward must use the transposed matrix."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, n * inner, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, n * inner, generator=g, dtype=torch.float64)
    fast, = torch.autograd.grad((hadamard_transform(x, inner) * weights).sum(), x)
    dense, = torch.autograd.grad((hadamard_transform_reference(x, inner) * weights).sum(), x)
    torch.testing.assert_close(fast, dense, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [576, 1536, 4096, 11008])
def test_cpu_transform_large_sizes_float32(n):
    x = torch.randn(3, n)
    expected = hadamard_transform_reference(x.double()).float() if n <= 4096 else None
    y = hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)  # orthonormal
    if expected is not None:
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


@given(n=st.sampled_from([n for n in ORDERS if n >= 8]), inner=st.sampled_from([1, 4]), rows=st.integers(1, 40),
       threads=st.integers(1, 3), seed=st.integers(0, 100))
@pytest.mark.usefixtures("python_bodies")
def test_float32_rows_take_the_c_stages_and_agree_with_the_gemm_stages(n, inner, rows, threads, seed):
    """Float32 rows are one C call (more than a decode step's only where every Paley factor is small:
    larger ones stay in BLAS GEMMs); its rows' bits depend neither on how many rows share the call
    (blocks of 16, a partial last one) nor on the thread count; the values are the stage GEMMs' to
    float rounding."""
    from quarot_fx.kernels import native
    from quarot_fx.kernels.hadamard_transform import c_stages_for_many_rows, hadamard_transform_cpu
    from quarot_fx.numerics.hadamard import hadamard_plan

    assert native.library() is not None, native.unavailable_reason()
    small_paley = c_stages_for_many_rows(hadamard_plan(n).factors)
    in_c = rows <= native.FEW_ROWS or small_paley
    calls = []
    real = native.hadamard_rows
    x = torch.randn(rows, n * inner, generator=torch.Generator().manual_seed(seed))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "hadamard_rows", lambda *a: calls.append(tuple(a[0].shape)) or real(*a))
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            together = hadamard_transform_cpu(x, inner)
        finally:
            torch.set_num_threads(previous)
        alone = torch.cat([hadamard_transform_cpu(x[r:r + 1], inner) for r in range(rows)])
    assert calls == [(rows, n * inner)] * in_c + [(1, n * inner)] * rows  # the inner axis rides along in C
    gemm_stages = hadamard_transform_cpu(x, inner, stage_gemms=True)
    if in_c:
        assert torch.equal(together, alone)
    else:
        assert torch.equal(together, gemm_stages)
    torch.testing.assert_close(together, gemm_stages, rtol=1e-4, atol=1e-5)


def test_a_large_paley_factor_stays_in_blas_for_many_rows_from_cpp_too():
    """68 = Paley(67): a decode step's rows in C, a prefill's by the stage GEMMs, also once C++ holds
    the plan."""
    from quarot_fx.kernels.hadamard_transform import C_DENSE_ORDER, hadamard_transform_cpu
    from quarot_fx.numerics.hadamard import hadamard_plan

    assert hadamard_plan(68).factors == (68,) and 68 > C_DENSE_ORDER
    torch.ops.quarot_fx.hadamard_transform.default(torch.randn(2, 68), 1)  # hands the plan to C++
    x = torch.randn(40, 68)
    assert torch.equal(torch.ops.quarot_fx.hadamard_transform.default(x, 1),
                       hadamard_transform_cpu(x, stage_gemms=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_types_accumulate_in_float32(dtype):
    x = torch.randn(4, 2, 96).to(dtype)
    y = hadamard_transform(x)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.float(), hadamard_transform_reference(x.double()).float(),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("n,inner", [(4, 16), (12, 8), (16, 64), (36, 16)])
def test_cross_head_transform(n, inner):
    x = torch.randn(2, 3, n * inner, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x, inner), hadamard_transform_reference(x, inner))


def test_transform_is_its_own_inverse_for_symmetric_sylvester():
    x = torch.randn(5, 256, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x)), x)


def test_non_contiguous_input_and_bad_arguments():
    x = torch.randn(8, 128, dtype=torch.float64)[:, ::2]
    torch.testing.assert_close(hadamard_transform(x), hadamard_transform_reference(x))
    with pytest.raises(ValueError, match="inner"):
        hadamard_transform(torch.randn(2, 10), 3)
    with pytest.raises(ValueError, match="order 9"):
        hadamard_transform(torch.randn(2, 9))
    with pytest.raises(TypeError, match="floating"):
        hadamard_transform(torch.ones(2, 4, dtype=torch.int32))


def test_opcheck():
    non_contiguous = torch.randn(2, 12, 4, 16).transpose(1, 2)
    for args in [(torch.randn(3, 48),), (torch.randn(2, 5, 64), 4), (torch.randn(2, 96).half(),),
                 (non_contiguous,), (torch.randn(3, 1),)]:
        torch.library.opcheck(hadamard_transform.default, args)


def test_op_compiles_with_inductor():
    fn = torch.compile(lambda t: hadamard_transform(t * 2.0) + 1.0, fullgraph=True)
    x = torch.randn(4, 576)
    torch.testing.assert_close(fn(x), hadamard_transform_reference(x * 2.0) + 1.0, rtol=1e-4, atol=1e-5)


# Triton under TRITON_INTERPRET=1 (set in conftest before the kernel module is imported).
triton_kernel = pytest.importorskip("quarot_fx.kernels.triton_hadamard")


@pytest.mark.parametrize("n,inner", [(2, 1), (12, 1), (16, 1), (20, 1), (36, 1), (48, 1), (64, 1), (12, 4), (8, 8)])
@pytest.mark.parametrize("rows", [1, 7])
def test_triton_transform_matches_reference(n, inner, rows):
    x = torch.randn(rows, n * inner)
    y = triton_kernel.triton_hadamard_transform(x, inner)
    torch.testing.assert_close(y, hadamard_transform_cpu_ref(x, inner), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_types(dtype):
    x = torch.randn(3, 40).to(dtype)
    y = triton_kernel.triton_hadamard_transform(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), hadamard_transform_reference(x.double()).float(), rtol=2e-2, atol=2e-2)


def test_triton_non_contiguous_and_batched():
    x = torch.randn(2, 3, 128)[..., ::2]
    torch.testing.assert_close(triton_kernel.triton_hadamard_transform(x), hadamard_transform(x),
                               rtol=1e-5, atol=1e-5)


def hadamard_transform_cpu_ref(x, inner):
    return hadamard_transform_reference(x.double(), inner).float()
