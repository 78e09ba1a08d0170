"""Plain torch implementations of Householder products: the ground truth for tests and the
baselines for benchmarks.

Everything here is differentiable by torch autograd and computes in the dtype it is given (pass
float64 tensors for a ground truth). Convention throughout: ``V`` is ``(..., k, n)``, one
Householder vector per row, ``H_i = I - 2 v_i v_i^T / (v_i^T v_i)`` and ``Q = H_1 H_2 ... H_k``.
``side="left"`` computes ``Q @ W`` (``Q.T @ W`` with ``transpose``) for ``W`` of shape
``(..., n, m)``; ``side="right"`` computes ``W @ Q`` (``W @ Q.T``) for ``W`` of shape ``(..., m, n)``.

These functions do no input validation; use :mod:`mose_kernels.functional` for that.
"""

from __future__ import annotations

import torch
from torch import Tensor


def wy_factor_ref(V: Tensor) -> Tensor:
    """Compact-WY factor ``T`` (upper triangular) with ``Q = I - V^T T V``.

    ``T^{-1} = diag(v_i^T v_i) / 2 + striu(V V^T)`` (LAPACK xLARFT, forward, rowwise vectors).
    """
    gram = V @ V.transpose(-1, -2)
    s_inv = torch.triu(gram, diagonal=1) + torch.diag_embed(0.5 * torch.diagonal(gram, dim1=-2, dim2=-1))
    eye = torch.eye(V.shape[-2], dtype=V.dtype, device=V.device).expand_as(s_inv)
    return torch.linalg.solve_triangular(s_inv, eye, upper=True)


def householder_matrix_ref(V: Tensor) -> Tensor:
    """Dense ``Q = H_1 ... H_k`` of shape ``(..., n, n)``, built one reflection at a time."""
    n = V.shape[-1]
    Q = torch.eye(n, dtype=V.dtype, device=V.device).expand(*V.shape[:-2], n, n).clone()
    for i in range(V.shape[-2]):
        v = V[..., i, :]
        # Q <- Q H_i = Q - 2 (Q v) v^T / (v^T v)
        qv = (Q @ v.unsqueeze(-1)) * (2.0 / (v * v).sum(-1))[..., None, None]
        Q = Q - qv @ v.unsqueeze(-2)
    return Q


def _as_left(W: Tensor, side: str, transpose: bool) -> tuple[Tensor, bool]:
    """Map any (side, transpose) to a left-side product: ``W Q = (Q^T W^T)^T``."""
    if side == "left":
        return W, transpose
    return W.transpose(-1, -2), not transpose


def householder_apply_dense(W: Tensor, V: Tensor, side: str = "left", transpose: bool = False) -> Tensor:
    """Build the dense ``n x n`` matrix ``Q`` and multiply: the naive baseline (O(n^2) memory)."""
    Q = householder_matrix_ref(V.to(W.dtype))
    Wl, t = _as_left(W, side, transpose)
    Y = (Q.transpose(-1, -2) if t else Q) @ Wl
    return Y if side == "left" else Y.transpose(-1, -2)


def householder_apply_sequential(
    W: Tensor, V: Tensor, side: str = "left", transpose: bool = False
) -> Tensor:
    """Apply the reflections one at a time (rank-1 updates), never forming ``Q``.

    ``Q W`` applies ``H_k`` first and ``H_1`` last; ``Q^T W`` the reverse.
    """
    Wl, t = _as_left(W, side, transpose)
    V = V.to(W.dtype)
    Y = Wl
    order = range(V.shape[-2]) if t else reversed(range(V.shape[-2]))
    for i in order:
        v = V[..., i, :]
        coeff = (v.unsqueeze(-2) @ Y) * (2.0 / (v * v).sum(-1))[..., None, None]  # (..., 1, m)
        Y = Y - v.unsqueeze(-1) @ coeff
    return Y if side == "left" else Y.transpose(-1, -2)


def householder_apply_wy(W: Tensor, V: Tensor, side: str = "left", transpose: bool = False) -> Tensor:
    """Compact WY with two GEMMs: ``Q W = W - V^T (T (V W))`` (reads ``W`` twice)."""
    Wl, t = _as_left(W, side, transpose)
    V = V.to(W.dtype)
    T = wy_factor_ref(V)
    X = V @ Wl
    P = (T.transpose(-1, -2) if t else T) @ X
    Y = Wl - V.transpose(-1, -2) @ P
    return Y if side == "left" else Y.transpose(-1, -2)
