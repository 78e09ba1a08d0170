"""Public entry points: products of Householder reflections applied to weight matrices.

Convention: ``V`` has shape ``(k, n)`` (or ``(..., k, n)`` for a batch), one Householder vector
per row, of any non-zero norm; ``H_i = I - 2 v_i v_i^T / (v_i^T v_i)``; ``Q = H_1 H_2 ... H_k``.
``Q`` is never formed (except by :func:`householder_matrix`): the compact-WY form
``Q = I - V^T T V`` turns every product into two skinny GEMMs and a ``k x k`` triangle.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mose_kernels.backends import resolve_backend
from mose_kernels.ops.householder import autograd as _autograd

_W_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_SIDES = ("left", "right")


def _check_vector_layout(V: Tensor) -> None:
    if not isinstance(V, Tensor):
        raise TypeError(f"V must be a torch.Tensor of shape (k, n), got {type(V).__name__}")
    if not V.is_floating_point() or V.is_complex():
        raise TypeError(f"V must be a real floating-point tensor, got dtype {V.dtype}")
    if V.dim() < 2:
        raise ValueError(f"V must have shape (k, n) or (..., k, n), got shape {tuple(V.shape)}")


def _check_vector_values(V: Tensor) -> None:
    """Finite, non-zero rows. Skipped while torch.compile traces (data-dependent checks)."""
    if V.shape[-2] == 0 or torch.compiler.is_compiling():
        return
    if not torch.isfinite(V).all():
        raise ValueError("V contains NaN or Inf; every Householder vector must be finite")
    norms = torch.linalg.vector_norm(V.double(), dim=-1)
    if (norms == 0).any():
        bad = torch.nonzero((norms == 0).flatten()).flatten()[:5].tolist()
        raise ValueError(
            f"V has zero-norm rows (flattened row indices {bad}); every Householder vector must "
            "be non-zero"
        )


def _check_vectors(V: Tensor) -> None:
    _check_vector_layout(V)
    _check_vector_values(V)


def _check_apply_args(W: Tensor, V: Tensor, side: str, transpose: bool) -> None:
    if not isinstance(W, Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.dtype not in _W_DTYPES:
        raise TypeError(
            f"W must have dtype float32, float16, bfloat16 or float64, got {W.dtype}"
        )
    if side not in _SIDES:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not isinstance(transpose, bool):
        raise TypeError(f"transpose must be a bool, got {type(transpose).__name__}")
    _check_vector_layout(V)
    if W.dim() < 2:
        raise ValueError(f"W must be a matrix or a batch of matrices, got shape {tuple(W.shape)}")
    if V.device != W.device:
        raise ValueError(f"W and V must be on the same device, got W on {W.device}, V on {V.device}")
    n = V.shape[-1]
    axis = -2 if side == "left" else -1
    if W.shape[axis] != n:
        expected = "(..., n, m)" if side == "left" else "(..., m, n)"
        raise ValueError(
            f"side={side!r} expects W of shape {expected} with n = V.shape[-1] = {n}, "
            f"got W of shape {tuple(W.shape)}"
        )
    if V.dim() > 2 and (V.dim() != W.dim() or V.shape[:-2] != W.shape[:-2]):
        raise ValueError(
            f"batched V {tuple(V.shape)} needs W with the same leading dimensions, got W "
            f"{tuple(W.shape)}; pass a 2-D V to apply one Q to every matrix of the batch"
        )
    _check_vector_values(V)


def wy_factor(V: Tensor) -> Tensor:
    """Compact-WY factor of ``Q = H_1 ... H_k``: upper-triangular ``T`` with ``Q = I - V^T T V``.

    Args:
        V: ``(k, n)`` or ``(..., k, n)`` Householder vectors (rows), finite and non-zero.

    Returns:
        ``T`` of shape ``(..., k, k)``, float64 if ``V`` is float64, else float32 (half-precision
        ``V`` is upcast), computed from ``T^{-1} = diag(V V^T) / 2 + striu(V V^T)``.
    """
    _check_vectors(V)
    dtype = torch.float64 if V.dtype == torch.float64 else torch.float32
    V3 = _autograd.flatten_batch(V).to(dtype).contiguous()
    if V3.shape[-2] == 0:
        return V3.new_zeros(*V.shape[:-1], 0)
    backend = resolve_backend("auto", V.device, dtype)
    return backend.factor(V3).reshape(*V.shape[:-1], V.shape[-2])


def householder_matrix(V: Tensor) -> Tensor:
    """Dense ``Q = H_1 ... H_k`` of shape ``(..., n, n)`` (float32, or float64 for float64 ``V``).

    Costs ``O(n^2)`` memory: for tests and small ``n`` only. ``k = 0`` gives the identity.
    """
    _check_vectors(V)
    dtype = torch.float64 if V.dtype == torch.float64 else torch.float32
    n = V.shape[-1]
    eye = torch.eye(n, dtype=dtype, device=V.device).expand(*V.shape[:-2], n, n)
    if V.shape[-2] == 0:
        return eye.clone()
    Vc = V.to(dtype)
    return eye - Vc.transpose(-1, -2) @ (wy_factor(Vc) @ Vc)


def householder_apply(
    W: Tensor, V: Tensor, *, side: str = "left", transpose: bool = False, backend: str = "auto"
) -> Tensor:
    """Multiply ``W`` by ``Q = H_1 ... H_k`` without forming ``Q``.

    Args:
        W: ``side="left"``: ``(n, m)`` or ``(..., n, m)``; ``side="right"``: ``(m, n)`` or
            ``(..., m, n)``. float32, float16, bfloat16 (float64 on the ``reference`` and ``cpu``
            backends). Any strides.
        V: ``(k, n)`` Householder vectors, one per row, any non-zero norm; or ``(..., k, n)`` with
            the same leading dimensions as ``W`` (one ``Q`` per matrix of the batch). Any float
            dtype; it is cast to the compute dtype (float32, or float64 for float64 ``W``).
        side: ``"left"`` returns ``Q @ W``; ``"right"`` returns ``W @ Q``.
        transpose: use ``Q.T`` instead of ``Q`` (``Q.T @ W`` or ``W @ Q.T``). ``W @ Q.T`` is the
            input-side edit of an ``nn.Linear`` weight.
        backend: ``"auto"`` (fastest for W's device and dtype; ``MOSE_BACKEND`` overrides it),
            ``"reference"``, ``"triton"``, ``"cpu"`` or ``"cuda"``; see
            :func:`mose_kernels.available_backends`.

    Returns:
        A new tensor of ``W``'s shape and dtype. Accumulation and ``T`` are float32 (float64 for
        float64 ``W``), rounded once on store. Differentiable in ``W`` and ``V`` (the backward
        saves ``V``, ``T`` and ``V W``: ``O(k (n + m))`` extra memory). ``k = 0`` is the identity.

    Raises:
        TypeError: integer or complex dtypes, non-tensor arguments.
        ValueError: wrong ranks, mismatched ``n`` or batch dimensions, mixed devices, zero-norm or
            non-finite rows of ``V``, an unknown or unavailable backend.

    Example:
        >>> W = torch.randn(4096, 1024)
        >>> V = torch.randn(16, 4096)
        >>> Y = householder_apply(W, V)               # Q @ W
        >>> torch.allclose(householder_apply(Y, V, transpose=True), W, atol=1e-4)
        True
    """
    _check_apply_args(W, V, side, transpose)
    chosen = resolve_backend(backend, W.device, W.dtype, V.shape[-2])
    if V.shape[-2] == 0 or W.numel() == 0:
        return W.clone()
    return _autograd.apply(W, V, side, transpose, chosen)


def householder_apply_(
    W: Tensor, V: Tensor, *, side: str = "left", transpose: bool = False, backend: str = "auto"
) -> Tensor:
    """In-place :func:`householder_apply`: overwrites ``W`` with the product and returns ``W``.

    Streams ``W`` in place with ``O(k m)`` extra memory (no ``n x m`` temporary), except for a
    batched ``W`` whose leading dimensions cannot be viewed flat, which goes through one
    out-of-place result. Not differentiable: raises ``RuntimeError`` when autograd would need
    ``W`` or ``V`` (wrap the call in ``torch.no_grad()`` to modify a parameter).
    """
    _check_apply_args(W, V, side, transpose)
    if torch.is_grad_enabled() and (W.requires_grad or V.requires_grad):
        raise RuntimeError(
            "householder_apply_ is not differentiable and W or V requires grad; use "
            "householder_apply for autograd, or call this under torch.no_grad()"
        )
    chosen = resolve_backend(backend, W.device, W.dtype, V.shape[-2])
    if V.shape[-2] == 0 or W.numel() == 0:
        return W
    _autograd.apply_inplace(W, V, side, transpose, chosen)
    return W
