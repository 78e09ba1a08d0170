"""Kernel backends of ``householder_apply`` and how ``backend=...`` is resolved.

Every backend implements one canonical operation, the left-side product on a batch:
``Y = Q W`` or ``Y = Q^T W`` with ``W`` of shape ``(b, n, m)``; the right side is the same
operation on the transposed view (``W Q = (Q^T W^T)^T``), so backends see strides, not sides.

Contract of the three callables (inputs are already validated by :mod:`mose_kernels.functional`):

- ``factor(V) -> T``: ``V`` is ``(b, k, n)`` contiguous in the compute dtype (float32, or float64
  for float64 weights), ``T`` is ``(b, k, k)`` upper triangular in the same dtype, ``Q = I - V^T T V``.
- ``forward(W, V, T, transpose, out) -> X``: writes ``Q W`` (``Q^T W`` if ``transpose``) into
  ``out`` (``(b, n, m)``, same dtype as ``W``, any strides; ``out`` may be ``W`` itself: in place,
  with no ``n x m`` temporary). Returns ``X = V W`` (``(b, k, m)``, compute dtype), which the
  backward reuses. Accumulates in the compute dtype and rounds once on store.
- ``backward(dY, W, V, T, X, transpose, need_dW, need_dV) -> (dW, dV)``: gradients of the forward;
  ``dW`` has ``W``'s dtype, ``dV`` the compute dtype; either may be ``None`` when not needed.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

BACKEND_NAMES = ("reference", "triton", "cpu", "cuda")
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    """One implementation of the canonical left-side Householder apply (see module docstring)."""

    name: str
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    factor: Callable[[Tensor], Tensor]
    forward: Callable[[Tensor, Tensor, Tensor, bool, Tensor], Tensor]
    backward: Callable[..., tuple[Tensor | None, Tensor | None]]
    # backend="auto" passes over this backend for more reflections than this (None: no limit).
    auto_max_k: int | None = None

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type in self.devices and dtype in self.dtypes


def _load_reference() -> Backend | None:
    from mose_kernels.ops.householder import wy_torch

    return wy_torch.BACKEND


def _load_triton() -> Backend | None:
    try:
        from mose_kernels.ops.householder import wy_triton
    except ImportError as exc:  # triton missing or broken: the backend is simply absent
        logger.debug("triton backend unavailable: %s", exc)
        return None
    return wy_triton.load_backend()


def _load_native(device_type: str) -> Backend | None:
    try:
        from mose_kernels import _ext
    except ImportError as exc:
        logger.debug("native backends unavailable: %s", exc)
        return None
    return _ext.load_backend(device_type)


_LOADERS: dict[str, Callable[[], Backend | None]] = {
    "reference": _load_reference,
    "triton": _load_triton,
    "cpu": functools.partial(_load_native, "cpu"),
    "cuda": functools.partial(_load_native, "cuda"),
}

# Preference of backend="auto", fastest first, per device type.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


@functools.cache
def get_backend(name: str) -> Backend | None:
    """The backend called ``name``, or ``None`` if it cannot run in this process."""
    if name not in _LOADERS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {BACKEND_NAMES}")
    return _LOADERS[name]()


def available_backends() -> list[str]:
    """Names of the backends that run here (``"triton"`` on a GPU, or on the CPU with
    ``TRITON_INTERPRET=1``; ``"cpu"``/``"cuda"`` when the native extension is built)."""
    return [name for name in BACKEND_NAMES if get_backend(name) is not None]


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, k: int = 0) -> Backend:
    """Resolve ``name`` (or ``"auto"``) to a backend that supports ``device`` and ``dtype``
    (and, for ``"auto"``, is among the fastest for ``k`` reflections).

    ``MOSE_BACKEND`` in the environment overrides ``"auto"`` (useful to pin benchmarks and tests).
    """
    if name == "auto":
        name = os.environ.get("MOSE_BACKEND", "auto")
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            backend = get_backend(candidate)
            if backend is None or not backend.supports(device, dtype):
                continue
            if backend.auto_max_k is None or k <= backend.auto_max_k:
                return backend
        raise ValueError(f"no backend supports W on device {device} with dtype {dtype}")
    backend = get_backend(name)
    if backend is None:
        raise ValueError(
            f"backend {name!r} is not available here; available: {available_backends()}"
        )
    if not backend.supports(device, dtype):
        raise ValueError(
            f"backend {name!r} supports devices {sorted(backend.devices)} and dtypes "
            f"{sorted(str(d) for d in backend.dtypes)}; got W on {device.type} with {dtype}"
        )
    return backend
