"""The native extensions (``csrc/``): loads the ``mose`` ops, registers their fake kernels, and wraps
them as :class:`~mose_kernels.backends.Backend` objects named ``"cpu"`` and ``"cuda"``.

``mose_kernels._C`` holds the op schemas and the CPU kernels; ``mose_kernels._C_cuda`` (optional)
adds CUDA kernels for the same ops. Both are plain shared libraries loaded with
:func:`torch.ops.load_library`. The ops work on the canonical batch of :mod:`mose_kernels.backends`;
the backward of the apply composes them (``X``, ``P`` and ``Z`` are ``k x m``; no ``n x m`` extras).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import Tensor

from mose_kernels.backends import Backend
from mose_kernels.ops.householder.wy_torch import small_backward_terms

logger = logging.getLogger(__name__)

_CPU_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})
_CUDA_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


def _load_library(module: str) -> bool:
    """Load ``mose_kernels.<module>`` (a shared library beside this file) into ``torch.ops``."""
    spec = importlib.util.find_spec(f"mose_kernels.{module}")
    if spec is None or spec.origin is None:
        logger.debug("native library mose_kernels.%s is not built", module)
        return False
    try:
        torch.ops.load_library(spec.origin)
    except OSError as exc:
        logger.warning("could not load native library %s: %s", spec.origin, exc)
        return False
    return True


def _register_fakes() -> None:
    """Shape-only kernels of every op, for torch.compile and meta tensors (called once, at import)."""

    @torch.library.register_fake("mose::wy_factor")
    def _(V: Tensor) -> Tensor:
        return V.new_empty(V.shape[0], V.shape[1], V.shape[1])

    @torch.library.register_fake("mose::householder_fwd")
    def _(W: Tensor, V: Tensor, T: Tensor, transpose: bool, out: Tensor) -> Tensor:
        return V.new_empty(V.shape[0], V.shape[1], W.shape[-1])

    @torch.library.register_fake("mose::householder_fwd_")
    def _(W: Tensor, V: Tensor, T: Tensor, transpose: bool) -> Tensor:
        return V.new_empty(V.shape[0], V.shape[1], W.shape[-1])

    @torch.library.register_fake("mose::project")
    def _(V: Tensor, W: Tensor) -> Tensor:
        return V.new_empty(V.shape[0], V.shape[1], W.shape[-1])

    @torch.library.register_fake("mose::reflect_update")
    def _(W: Tensor, V: Tensor, P: Tensor, out: Tensor) -> None:
        return None


def factor(V: Tensor) -> Tensor:
    """``T`` with ``Q = I - V^T T V`` (``V`` contiguous ``(b, k, n)``, float32/float64)."""
    return torch.ops.mose.wy_factor(V)


def forward(W: Tensor, V: Tensor, T: Tensor, transpose: bool, out: Tensor) -> Tensor:
    """``out = Q W`` (``Q^T W``), in place when ``out`` is ``W``; returns ``X = V W``."""
    if out is W:
        return torch.ops.mose.householder_fwd_(W, V, T, transpose)
    return torch.ops.mose.householder_fwd(W, V, T, transpose, out)


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
    """Analytic backward of ``Y = W - V^T A X`` (``A = T`` or ``T^T``), see MOSE_NOTES.md section 2."""
    Z = torch.ops.mose.project(V, dY)  # V dY, (b, k, m)
    P, R, C = small_backward_terms(T, X, Z, transpose)
    dW = None
    if need_dW:
        dW = torch.empty(dY.shape, dtype=W.dtype, device=W.device)
        torch.ops.mose.reflect_update(dY, V, R, dW)
    dV = None
    if need_dV:
        dV = C @ V
        dV = dV - torch.ops.mose.project(P, dY.transpose(-1, -2))
        dV = dV - torch.ops.mose.project(R, W.transpose(-1, -2))
    return dW, dV


# The CPU kernel is register-tiled for few reflections; from k = 64 the BLAS GEMMs of the reference
# backend win (bench/results/cpu-kernels.json, LLaMA-3-8B fp32, 1 thread: k = 16 1.43 s vs 1.49 s,
# k = 64 5.9 s vs 1.5 s out of place), so backend="auto" uses it up to k = 32 only.
_CPU_AUTO_MAX_K = 32


def _make_backend(device_type: str, dtypes: frozenset[torch.dtype]) -> Backend:
    return Backend(
        name=device_type,
        devices=frozenset({device_type}),
        dtypes=dtypes,
        factor=factor,
        forward=forward,
        backward=backward,
        auto_max_k=_CPU_AUTO_MAX_K if device_type == "cpu" else None,
    )


# Loaded once, at import (like a compiled module), so that backend lookups traced by torch.compile
# never reach torch.ops.load_library.
HAS_CPU = _load_library("_C")
if HAS_CPU:
    _register_fakes()
HAS_CUDA = HAS_CPU and _load_library("_C_cuda")
_BACKENDS: dict[str, Backend | None] = {
    "cpu": _make_backend("cpu", _CPU_DTYPES) if HAS_CPU else None,
    "cuda": _make_backend("cuda", _CUDA_DTYPES) if HAS_CUDA else None,
}


def load_backend(device_type: str) -> Backend | None:
    """The native backend for ``device_type`` (``"cpu"`` or ``"cuda"``), or ``None`` when its library
    is not built, cannot load, or (for CUDA) no GPU is visible."""
    if device_type not in _BACKENDS:
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        return None
    return _BACKENDS[device_type]
