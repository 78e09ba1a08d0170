"""Exact conversion of dense Householder vectors to LAPACK storage (for the LAPACK competitors).

LAPACK (``xORGQR``/``xORMQR``, ``torch.linalg.householder_product``, ``torch.ormqr``) stores ``k``
reflectors ``H'_i = I - tau_i a_i a_i^T`` as the columns of a unit lower-trapezoidal ``n x k`` matrix
``A`` (``a_i[j] = 0`` for ``j < i``, ``a_i[i] = 1``). Our vectors are dense, so they cannot be passed
as they are, and a QR (``geqrf``) of ``Q``'s first ``k`` columns is *not* the same operator:
``geqrf`` maps each column to ``-sign(x_i) ||x|| e_i``, whose reflectors leave ``span(V)`` and differ
from ``Q`` on the other ``n - k`` columns.

The representation used here is exact. ``Q = H_1 ... H_k`` differs from ``I`` only on the
``k``-dimensional ``span(V)``. Take ``H'_1`` as the reflector that maps ``e_1`` to ``Q e_1`` (its vector
``e_1 - Q e_1`` lies in ``span(V)``); then ``H'_1 Q`` fixes ``e_1`` and is orthogonal, so the next
vector ``e_2 - (H'_1 Q) e_2`` has a zero first entry, and so on. After ``k`` steps the remainder fixes
``e_1..e_k`` and ``span(V)^perp``, which together span the space whenever the leading ``k x k`` block
of ``V^T`` is invertible (true for generic vectors), so ``Q = H'_1 ... H'_k`` exactly: the same ``k``
reflectors' worth of work, in LAPACK's layout. The conversion runs in float64, ``O(n k^2)``, once,
outside every timing, and checks its own residual.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mose_kernels.reference import wy_factor_ref


def to_lapack(V: Tensor, *, check: bool = True) -> tuple[Tensor, Tensor]:
    """LAPACK storage ``(A, tau)`` of ``Q = H_1 ... H_k`` given by dense rows ``V`` (``(k, n)``).

    Returns ``A`` (``(n, k)``, unit lower trapezoidal) and ``tau`` (``(k,)``), float64 on ``V``'s
    device, such that ``torch.linalg.householder_product`` of them (padded to ``n`` columns) is ``Q``.

    Raises:
        ValueError: ``V`` is not ``(k, n)`` with ``k <= n``, or the leading block of ``V^T`` is too
            close to singular for an exact conversion (residual check).
    """
    if V.dim() != 2 or V.shape[0] > V.shape[1]:
        raise ValueError(f"V must have shape (k, n) with k <= n, got {tuple(V.shape)}")
    k, n = V.shape
    V64 = V.detach().to(torch.float64)
    T = wy_factor_ref(V64)
    A = torch.zeros(n, k, dtype=torch.float64, device=V.device)
    tau = torch.zeros(k, dtype=torch.float64, device=V.device)
    for i in range(k):
        # d = (I - Q_i) e_i with Q_i = H'_{i-1} ... H'_1 Q; (I - Q) e_i = V^T T V[:, i] has no
        # cancellation; the earlier reflectors are then applied to Q e_i = e_i - d0.
        col = -(V64.T @ (T @ V64[:, i]))  # Q e_i - e_i
        col[i] += 1.0  # Q e_i
        for j in range(i):
            col -= tau[j] * A[:, j] * (A[:, j] @ col)
        d = -col
        d[i] += 1.0  # e_i - Q_i e_i
        d[:i] = 0.0  # exact zeros above the diagonal (rounding residue only)
        denom = d[i]
        if denom.abs() < 1e-300:  # column already e_i: identity reflector
            A[i, i] = 1.0
            continue
        A[:, i] = d / denom
        tau[i] = 2.0 * denom**2 / (d @ d)
    if check:
        _check_residual(V64, A, tau)
    return A, tau


def _check_residual(V64: Tensor, A: Tensor, tau: Tensor) -> None:
    """``Q x`` from both representations on a few random vectors must agree to ~1e-10."""
    n = V64.shape[1]
    x = torch.randn(n, 4, dtype=torch.float64, device=V64.device, generator=torch.Generator(V64.device).manual_seed(0))
    y_ref = x - V64.T @ (wy_factor_ref(V64) @ (V64 @ x))
    y_lap = torch.ormqr(A, tau, x, left=True, transpose=False)
    err = (torch.linalg.vector_norm(y_ref - y_lap) / torch.linalg.vector_norm(y_ref)).item()
    if not err < 1e-9:
        raise ValueError(
            f"LAPACK conversion inexact (relative residual {err:.2e}): the leading k x k block of V^T "
            "is (nearly) singular"
        )
