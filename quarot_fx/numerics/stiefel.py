"""Gradient steps that keep a matrix orthogonal: Cayley SGD on the Stiefel manifold (Li et al. 2020).

SpinQuant learns its rotations this way. A step moves R along the curve (I + α/2·W)⁻¹(I − α/2·W)·R
for the skew-symmetric W = G·Rᵀ − R·Gᵀ built from the Euclidean gradient G: a Cayley transform of a
skew matrix is orthogonal, so R stays a rotation without a projection. The inverse is replaced by
two fixed-point iterations (exact to O(α³)); a QR re-orthogonalisation catches any drift.
"""

from __future__ import annotations

import torch

DRIFT = 1e-5  # max |RᵀR − I| tolerated before re-orthogonalising


def orthogonality_error(r: torch.Tensor) -> float:
    """max |RᵀR − I|: 0 for an exactly orthogonal matrix."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    return (r.T @ r - eye).abs().max().item()


def reorthogonalize(r: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor of R's QR (signs fixed so a near-orthogonal R barely moves)."""
    q, upper = torch.linalg.qr(r)
    return q * torch.sign(torch.diagonal(upper)).where(torch.diagonal(upper) != 0, torch.ones(()))[None, :]


def cayley_step(r: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """One Cayley SGD step from R with Euclidean gradient ``grad`` (both [n, n]); returns the new R.

    The step size is capped at 1/‖W‖ (Li et al.), which keeps the fixed-point iteration contracting
    and the step small where the gradient is large."""
    w = grad @ r.T - r @ grad.T  # skew-symmetric
    alpha = min(lr, 1.0 / (torch.linalg.matrix_norm(w).item() + 1e-8))
    y = r - alpha * (w @ r)
    for _ in range(2):
        y = r - (alpha / 2) * (w @ (r + y))
    if orthogonality_error(y) > DRIFT:
        y = reorthogonalize(y)
    return y
