"""``quarot_fx::hadamard_transform``: x ↦ x·(H_m ⊗ I_inner)/√m along the last dimension.

The output is always a new contiguous tensor of x's shape and dtype.

H_m = F_1 ⊗ … ⊗ F_c (see :func:`quarot_fx.numerics.hadamard.hadamard_plan`), so the transform is c
small matmuls, one per Kronecker factor, instead of one dense m×m matmul: the power-of-two
part runs as a radix-≤64 butterfly, Paley factors as dense blocks. ``inner > 1`` gives the
"cross-head" transform (H over heads, identity inside each head) that online R2 needs.

CPU, float32 (the quantized graphs' online rotations): the C stages (``native.hadamard_rows``:
butterflies for the power-of-two factors, dense blocks for Paley ones, rows in vectorized blocks
split over torch's threads). Elsewhere (float64, autograd's transpose, no C compiler, and a
prefill's many rows of a plan with a Paley factor above ``C_DENSE_ORDER``) each stage is one GEMM
on the last axis followed by an axis rotation, so after c stages the axes are back in order. The
two sum in other orders and agree to float rounding. CUDA: the Triton kernel in
``triton_hadamard``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from quarot_fx.numerics.hadamard import hadamard_matrix, hadamard_plan

from .common import check_hadamard as _check
from .common import compute_dtype, define_op, row_chunks, stage_matrix


def hadamard_transform_reference(x: torch.Tensor, inner: int = 1) -> torch.Tensor:
    """Plain dense reference: x @ kron(H_m, I_inner) / √m (in float64)."""
    m = _check(x, inner)
    h = torch.kron(hadamard_matrix(m, torch.float64), torch.eye(inner, dtype=torch.float64))
    return (x.to(torch.float64) @ h.to(x.device) / math.sqrt(m)).to(x.dtype)


def _stage_gemms(y: torch.Tensor, m: int, inner: int, factors, ctype, transpose: bool = False) -> torch.Tensor:
    """One block [rows, m·inner] (compute dtype) → its transform, same layout. ``transpose``:
    by (F_1 ⊗ … ⊗ F_c)ᵀ = F_1ᵀ ⊗ … ⊗ F_cᵀ, every stage with its factor transposed."""
    rows = y.shape[0]
    # Put the Hadamard axis last; the inner (per-head) axis rides along as batch.
    y = y.reshape(rows, m, inner).transpose(1, 2).reshape(rows * inner, m) if inner > 1 else y
    batch = y.shape[0]
    for stage, order in enumerate(reversed(factors)):
        scale = 1.0 / math.sqrt(m) if stage == 0 else 1.0
        h = stage_matrix(order, scale, str(y.device), ctype)
        h = h.T if transpose else h
        y = (y.reshape(-1, order) @ h).reshape(batch, m // order, order).transpose(1, 2).reshape(batch, m)
    return y.reshape(rows, inner, m).transpose(1, 2).reshape(rows, m * inner) if inner > 1 else y


# The C stages multiply a Paley factor naively (o multiply-adds per element, no cache blocking): for
# many rows a larger one belongs in a BLAS GEMM.
C_DENSE_ORDER = 64


def _takes_c_stages(flat: torch.Tensor, factors, ctype) -> bool:
    """A decode step's few rows always (the stage GEMMs cost more in calls than in arithmetic); more
    rows where every Paley factor is small (butterflies: log₂ o adds per element where a GEMM does o
    multiply-adds, and no transposes)."""
    from . import native

    return (ctype == torch.float32 and flat.device.type == "cpu" and native.library() is not None
            and (flat.shape[0] <= native.FEW_ROWS or c_stages_for_many_rows(tuple(factors))))


@lru_cache(maxsize=None)
def c_stages_for_many_rows(factors: tuple) -> bool:
    """Whether the C stages take a prefill's rows of this plan: every Paley factor ≤ ``C_DENSE_ORDER``."""
    return all(_sylvester(order) or order <= C_DENSE_ORDER for order in factors)


def _sylvester(order: int) -> bool:
    """Powers of two are Sylvester factors in natural order (``factor_matrix``): butterflies in C."""
    return order & (order - 1) == 0


@lru_cache(maxsize=None)
def _c_plan(m: int, factors: tuple) -> tuple:
    """(orders, matrices, scale) for ``native.hadamard_rows``: None for a Sylvester factor."""
    return (factors, tuple(None if _sylvester(order) else stage_matrix(order, 1.0, "cpu", torch.float32)
                           for order in factors), 1.0 / math.sqrt(m))


def c_stages_plan(flat: torch.Tensor, inner: int, ctype: torch.dtype = torch.float32) -> tuple | None:
    """Where the C stages take these rows [rows, m·inner] (``_takes_c_stages``), their plan:
    ``native.hadamard_rows``'s (orders, matrices, scale), each factor along its own axis, the
    power-of-two ones as butterflies, the ``inner`` axis untouched; handed over to the C++
    kernels too, so later calls of the width stay there. Else None."""
    from . import native_ops

    m = flat.shape[1] // inner
    factors = tuple(hadamard_plan(m).factors)
    if not factors or not _takes_c_stages(flat, factors, ctype):
        return None
    plan = _c_plan(m, factors)
    native_ops.add_plan(flat.shape[1], inner, *plan, c_stages_for_many_rows(factors))
    return plan


def hadamard_transform_cpu(x: torch.Tensor, inner: int = 1, transpose: bool = False,
                           stage_gemms: bool = False) -> torch.Tensor:
    """The transform (``transpose``: by the transposed matrix, the inverse: what autograd needs;
    ``stage_gemms``: by torch GEMMs even where the C stages would run, for tests and benchmarks)."""
    m = _check(x, inner)
    factors = hadamard_plan(m).factors
    if not factors:  # m == 1: H_1 = [1]
        return x.clone(memory_format=torch.contiguous_format)
    ctype = compute_dtype(x.dtype)
    n = x.shape[-1]
    flat = x.reshape(-1, n)
    plan = None if transpose or stage_gemms else c_stages_plan(flat, inner, ctype)
    if plan is not None:
        from . import native
        return native.hadamard_rows(flat.float(), *plan).to(x.dtype).reshape(x.shape)
    out = torch.empty(flat.shape, dtype=x.dtype, device=x.device)
    for rows in row_chunks(flat.shape[0], n * 4):
        out[rows] = _stage_gemms(flat[rows].to(ctype), m, inner, factors, ctype, transpose)
    return out.reshape(x.shape)


@define_op("quarot_fx::hadamard_transform", python_twin=True)
def hadamard_transform(x: torch.Tensor, inner: int = 1) -> torch.Tensor:
    """x·(H_m ⊗ I_inner)/√m along the last dim, m = x.shape[-1] // inner (orthonormal)."""
    return hadamard_transform_cpu(x, inner)


@hadamard_transform.register_fake
def _(x: torch.Tensor, inner: int = 1) -> torch.Tensor:
    _check(x, inner)
    return x.new_empty(x.shape)  # contiguous, like every real kernel's output


def _save_inner(ctx, inputs, output) -> None:
    ctx.inner = inputs[1] if len(inputs) > 1 else 1


def _backward(ctx, grad: torch.Tensor):
    """The map is x ↦ x·M, M orthogonal: the input's gradient is grad·Mᵀ (GBS's Fisher objective
    takes loss gradients through the online rotations)."""
    return hadamard_transform_cpu(grad, ctx.inner, transpose=True), None


hadamard_transform.register_autograd(_backward, setup_context=_save_inner)


@hadamard_transform.register_kernel("cuda")
def _(x: torch.Tensor, inner: int = 1) -> torch.Tensor:
    from .triton_hadamard import triton_hadamard_transform

    return triton_hadamard_transform(x, inner)
