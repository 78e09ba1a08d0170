"""Autograd wrapper of the Householder apply: maps every side and transpose onto the canonical
left-side batch ``(b, n, m)`` that the backends implement, normalises the vectors, and saves only
the unit vectors, ``T`` and ``X = U W`` (``k x k`` and ``k x m`` extras; never ``Q`` or another
``n x m`` tensor)."""

from __future__ import annotations

import torch
from torch import Tensor

from mose_kernels.backends import Backend


def compute_dtype(w_dtype: torch.dtype) -> torch.dtype:
    """Dtype of V, T and all accumulation: float64 for float64 weights, else float32."""
    return torch.float64 if w_dtype == torch.float64 else torch.float32


def to_canonical(W: Tensor, side: str, transpose: bool) -> tuple[Tensor, bool]:
    """View ``W`` as the left operand ``(..., n, m)``: ``W Q = (Q^T W^T)^T``."""
    if side == "left":
        return W, transpose
    return W.transpose(-1, -2), not transpose


def flatten_batch(x: Tensor) -> Tensor:
    """``(..., r, c) -> (b, r, c)``; a view whenever strides allow it."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.reshape(-1, *x.shape[-2:])


def prepare_vectors(V: Tensor, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Unit rows of ``V`` as a contiguous ``(batch, k, n)`` tensor in the compute dtype, and the
    row norms. A reflection does not depend on its vector's scale; unit rows keep ``T`` well
    scaled (``T^{-1} = I/2 + striu(U U^T)``) whatever the norms the caller passes."""
    V3 = flatten_batch(V).to(dtype)
    norms = torch.linalg.vector_norm(V3, dim=-1, keepdim=True)
    U3 = (V3 / norms).expand(batch, *V3.shape[-2:]).contiguous()
    return U3, norms


def apply_inplace(W: Tensor, V: Tensor, side: str, transpose: bool, backend: Backend) -> None:
    """``W <- Q W`` (or the other side/transpose) with no ``n x m`` temporary when ``W``'s batch
    dimensions can be viewed flat; otherwise through one out-of-place result copied back."""
    Wc, t = to_canonical(W, side, transpose)
    W3 = flatten_batch(Wc)
    if W3.data_ptr() != Wc.data_ptr():  # reshape had to copy
        W.copy_(apply(W, V, side, transpose, backend))
        return
    U3, _ = prepare_vectors(V, W3.shape[0], compute_dtype(W.dtype))
    backend.forward(W3, U3, backend.factor(U3), t, W3)


class HouseholderApplyFunction(torch.autograd.Function):
    """``Y = Q W`` (any side/transpose) through a backend's fused forward and backward."""

    @staticmethod
    def forward(ctx, W: Tensor, V: Tensor, side: str, transpose: bool, backend: Backend) -> Tensor:
        out = torch.empty(W.shape, dtype=W.dtype, device=W.device)
        Wc, t = to_canonical(W, side, transpose)
        W3 = flatten_batch(Wc)
        U3, norms = prepare_vectors(V, W3.shape[0], compute_dtype(W.dtype))
        T3 = backend.factor(U3)
        X3 = backend.forward(W3, U3, T3, t, flatten_batch(to_canonical(out, side, transpose)[0]))
        ctx.save_for_backward(W3, U3, T3, X3, norms)
        ctx.meta = (side, t, W.shape, V.shape, V.dtype, backend)
        return out

    @staticmethod
    def backward(ctx, dY: Tensor):
        W3, U3, T3, X3, norms = ctx.saved_tensors
        side, t, w_shape, v_shape, v_dtype, backend = ctx.meta
        need_dW, need_dV = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dY3 = flatten_batch(to_canonical(dY, side, False)[0])
        dW3, dU3 = backend.backward(dY3, W3, U3, T3, X3, t, need_dW, need_dV)
        dW = dV = None
        if dW3 is not None:
            dWc = dW3.reshape(*w_shape[:-2], *dW3.shape[-2:])
            dW = dWc if side == "left" else dWc.transpose(-1, -2)
        if dU3 is not None:
            if dU3.shape[0] != norms.shape[0]:  # one V broadcast over the batch
                dU3 = dU3.sum(0, keepdim=True)
            U = U3[: norms.shape[0]]
            # through u = v / |v|: dv = (du - (du . u) u) / |v|
            dV3 = (dU3 - (dU3 * U).sum(-1, keepdim=True) * U) / norms
            dV = dV3.reshape(v_shape).to(v_dtype)
        return dW, dV, None, None, None


def apply(W: Tensor, V: Tensor, side: str, transpose: bool, backend: Backend) -> Tensor:
    """Out-of-place apply, differentiable in ``W`` and ``V``."""
    return HouseholderApplyFunction.apply(W, V, side, transpose, backend)
