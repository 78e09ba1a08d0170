"""The ``reference`` backend: compact WY with torch matmuls and a triangular solve.

Runs on every device and dtype torch supports. Half-precision weights are processed in row
blocks that are upcast to float32, so a result is rounded once on store and the in-place path
never holds an ``n x m`` temporary. The backward is the analytic one from ``README.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mose_kernels.backends import Backend
from mose_kernels.reference import wy_factor_ref

# Rows of W upcast at a time for half-precision weights: 8 MiB of float32 at m = 4096.
_ROW_BLOCK_ELEMS = 1 << 21


def factor(V: Tensor) -> Tensor:
    """``T`` with ``T^{-1} = diag(G)/2 + striu(G)``, ``G = V V^T``, contiguous."""
    return wy_factor_ref(V).contiguous()


def _row_blocks(n: int, m: int) -> range:
    step = max(1, _ROW_BLOCK_ELEMS // max(m, 1))
    return range(0, n, step)


def _project(V: Tensor, W: Tensor) -> Tensor:
    """``X = V W`` in V's (compute) dtype, upcasting ``W`` one row block at a time if needed."""
    if W.dtype == V.dtype:
        return V @ W
    n, m = W.shape[-2:]
    step = max(1, _ROW_BLOCK_ELEMS // max(m, 1))
    X = torch.zeros(*V.shape[:-1], m, dtype=V.dtype, device=V.device)
    for start in _row_blocks(n, m):
        stop = min(start + step, n)
        X.baddbmm_(V[..., start:stop], W[..., start:stop, :].to(V.dtype))
    return X


def _subtract_update(W: Tensor, V: Tensor, P: Tensor, out: Tensor) -> None:
    """``out = W - V^T P``, rounding once to ``out.dtype``."""
    Vt = V.transpose(-1, -2)
    if W.dtype == V.dtype:
        if out is not W:
            out.copy_(W)
        out.baddbmm_(Vt, P, alpha=-1.0)
        return
    n, m = W.shape[-2:]
    step = max(1, _ROW_BLOCK_ELEMS // max(m, 1))
    for start in _row_blocks(n, m):
        stop = min(start + step, n)
        block = torch.baddbmm(W[..., start:stop, :].to(V.dtype), Vt[..., start:stop, :], P, alpha=-1.0)
        out[..., start:stop, :].copy_(block)


def forward(W: Tensor, V: Tensor, T: Tensor, transpose: bool, out: Tensor) -> Tensor:
    X = _project(V, W)
    P = (T.transpose(-1, -2) if transpose else T) @ X
    _subtract_update(W, V, P, out)
    return X


def small_backward_terms(T: Tensor, X: Tensor, Z: Tensor, transpose: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k x k`` / ``k x m`` part of the backward of ``Y = W - V^T A X`` (``A = T`` or ``T^T``).

    With ``Z = V dY`` returns ``P = A X``, ``R = A^T Z`` and ``C = dG + dG^T``, so that
    ``dW = dY - V^T R`` and ``dV = C V - P dY^T - R W^T`` (derivation in README.md). Shared by
    every backend; only the ``n``-sized products differ between them.
    """
    A = T.transpose(-1, -2) if transpose else T
    P = A @ X
    R = A.transpose(-1, -2) @ Z
    M = X @ Z.transpose(-1, -2) if transpose else Z @ X.transpose(-1, -2)  # -dL/dT
    Tt = T.transpose(-1, -2)
    dS = Tt @ M @ Tt
    dG = torch.triu(dS, diagonal=1) + torch.diag_embed(0.5 * torch.diagonal(dS, dim1=-2, dim2=-1))
    return P.contiguous(), R.contiguous(), (dG + dG.transpose(-1, -2)).contiguous()


def backward(
    dY: Tensor,
    W: Tensor,
    V: Tensor,
    T: Tensor,
    X: Tensor,
    transpose: bool,
    need_dW: bool,
    need_dV: bool,
) -> tuple[Tensor | None, Tensor | None]:
    Z = _project(V, dY)  # V dY, (b, k, m)
    P, R, C = small_backward_terms(T, X, Z, transpose)
    dW = None
    if need_dW:
        dW = torch.empty(dY.shape, dtype=W.dtype, device=W.device)
        _subtract_update(dY, V, R, dW)
    dV = None
    if need_dV:
        dV = C @ V
        dV -= _project(P, dY.transpose(-1, -2)) + _project(R, W.transpose(-1, -2))
    return dW, dV


BACKEND = Backend(
    name="reference",
    devices=frozenset({"cpu", "cuda", "mps", "xpu"}),
    dtypes=frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16}),
    factor=factor,
    forward=forward,
    backward=backward,
)
