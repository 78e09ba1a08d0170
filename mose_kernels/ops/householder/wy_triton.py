"""The ``triton`` backend: compact WY with Triton kernels (contract in :mod:`mose_kernels.backends`).

Kernels, one family per file beside this one:

- ``triton_factor``: ``G = V V^T`` split over n, then ``T = S^{-1}`` by the LARFT recurrence.
- ``triton_apply``: the fused forward, one launch over column stripes (``k <= 128``).
- ``triton_project`` + ``triton_update``: the split forward ``X = V W`` (split-n with atomics for
  small ``m``), ``P = A X`` (``k x k`` by ``k x m`` in torch), ``Y = W - V^T P``; used for
  ``k > 128`` or when the stripes of the fused kernel would leave most SMs idle.
- ``triton_apply_bwd``: ``dV`` and ``dW`` in one pass over ``dY`` and ``W`` after ``Z = V dY``
  (``triton_project``); ``dW`` alone (or ``k > 128``) reuses the forward: ``dW = Q^T dY``.

Under ``torch.compile`` the backend calls them through custom ops, ``torch.ops.mose_triton``
(``wy_factor``, ``apply_fwd``, ``apply_fwd_`` in place, ``apply_bwd``), with shape-only fake
implementations: ``fullgraph=True`` sees each as one opaque call. Eager calls skip the op
dispatch. ``torch.library.triton_op`` would let Inductor see the kernels, but its fake pass
launches them, which the interpreter cannot do with fake tensors; only a GPU could test it.

Runs on CUDA, or on CPU tensors in the Triton interpreter (``TRITON_INTERPRET=1`` set before
``triton`` is imported). float32 / float16 / bfloat16 weights; ``V``, ``T`` and all accumulation
in float32.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from mose_kernels.backends import Backend
from mose_kernels.ops.householder.triton_apply import wy_apply_fused
from mose_kernels.ops.householder.triton_apply_bwd import wy_apply_bwd
from mose_kernels.ops.householder.triton_common import MAX_FUSED_BK, sm_count
from mose_kernels.ops.householder.triton_factor import wy_factor
from mose_kernels.ops.householder.triton_project import project
from mose_kernels.ops.householder.triton_update import update
from mose_kernels.ops.householder.wy_torch import small_backward_terms

logger = logging.getLogger(__name__)

# The fused kernel runs one program per 32..64-column stripe; below this fraction of the SMs
# busy, the split path (more, smaller programs, W read twice from HBM) is the faster bet.
_MIN_STRIPE_FRACTION = 0.5


def use_fused(b: int, m: int, k: int, device: torch.device) -> bool:
    """Whether the one-launch forward applies: ``k <= 128`` and enough 32-column stripes."""
    stripes = b * ((m + 31) // 32)
    return k <= MAX_FUSED_BK and stripes >= _MIN_STRIPE_FRACTION * sm_count(device)


def _reflector_matrix(T: Tensor, transpose: bool) -> Tensor:
    return T.transpose(-1, -2) if transpose else T


def forward(
    W: Tensor, V: Tensor, T: Tensor, transpose: bool, out: Tensor, fused: bool | None = None
) -> Tensor:
    """``out = Q W`` (``Q^T W``); returns ``X = V W``. ``fused`` forces a path (tests)."""
    b, _, m = W.shape
    k = V.shape[1]
    if fused is None:
        fused = use_fused(b, m, k, W.device)
    if fused:
        return wy_apply_fused(W, V, T, transpose, out)
    X = project(V, W)
    update(W, V, _reflector_matrix(T, transpose) @ X, out)
    return X


def backward(
    dY: Tensor,
    W: Tensor,
    V: Tensor,
    T: Tensor,
    X: Tensor,
    transpose: bool,
    need_dW: bool,
    need_dV: bool,
    fused: bool | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``Y = W - V^T A X`` (``A = T``, or ``T^T`` if ``transpose``); see MOSE_NOTES 2.

    ``fused`` forces the forward path used for ``dW = Q^T dY`` when ``dW`` comes from the forward.
    """
    if not need_dV:
        if not need_dW:
            return None, None
        dW = torch.empty(dY.shape, dtype=W.dtype, device=W.device)
        forward(dY, V, T, not transpose, dW, fused=fused)
        return dW, None
    dW = torch.empty(dY.shape, dtype=W.dtype, device=W.device) if need_dW else None
    dW_in_dV_pass = dW is not None and V.shape[1] <= MAX_FUSED_BK
    # Z = V dY; for k > 128 the forward on dY writes dW = Q^T dY on the way.
    Z = project(V, dY) if dW is None or dW_in_dV_pass else forward(dY, V, T, not transpose, dW, fused=fused)
    P, R, C = small_backward_terms(T, X, Z, transpose)
    dV = wy_apply_bwd(dY, W, V, C, P, R, dW if dW_in_dV_pass else None)
    return dW, dV


@torch.library.custom_op("mose_triton::wy_factor", mutates_args=())
def _factor_op(V: Tensor) -> Tensor:
    return wy_factor(V)


@_factor_op.register_fake
def _(V: Tensor) -> Tensor:
    return V.new_empty(V.shape[0], V.shape[1], V.shape[1])


@torch.library.custom_op("mose_triton::apply_fwd", mutates_args=("out",))
def _apply_fwd_op(W: Tensor, V: Tensor, T: Tensor, transpose: bool, out: Tensor) -> Tensor:
    return forward(W, V, T, transpose, out)


@_apply_fwd_op.register_fake
def _(W: Tensor, V: Tensor, T: Tensor, transpose: bool, out: Tensor) -> Tensor:
    return V.new_empty(V.shape[0], V.shape[1], W.shape[2])


@torch.library.custom_op("mose_triton::apply_fwd_", mutates_args=("W",))
def _apply_fwd_inplace_op(W: Tensor, V: Tensor, T: Tensor, transpose: bool) -> Tensor:
    return forward(W, V, T, transpose, W)


@_apply_fwd_inplace_op.register_fake
def _(W: Tensor, V: Tensor, T: Tensor, transpose: bool) -> Tensor:
    return V.new_empty(V.shape[0], V.shape[1], W.shape[2])


@torch.library.custom_op("mose_triton::apply_bwd", mutates_args=())
def _apply_bwd_op(
    dY: Tensor, W: Tensor, V: Tensor, T: Tensor, X: Tensor, transpose: bool, need_dW: bool, need_dV: bool
) -> tuple[Tensor, Tensor]:
    dW, dV = backward(dY, W, V, T, X, transpose, need_dW, need_dV)
    return (W.new_empty(0) if dW is None else dW), (V.new_empty(0) if dV is None else dV)


@_apply_bwd_op.register_fake
def _(
    dY: Tensor, W: Tensor, V: Tensor, T: Tensor, X: Tensor, transpose: bool, need_dW: bool, need_dV: bool
) -> tuple[Tensor, Tensor]:
    dW = W.new_empty(dY.shape) if need_dW else W.new_empty(0)
    return dW, (V.new_empty(V.shape) if need_dV else V.new_empty(0))


# Eager calls go straight to the launchers (a custom-op dispatch costs tens of microseconds, the
# order of a whole apply at LLaMA shapes); under torch.compile the opaque ops are traced instead.


def _op_factor(V: Tensor) -> Tensor:
    if not torch.compiler.is_compiling():
        return wy_factor(V)
    return torch.ops.mose_triton.wy_factor(V)


def _op_forward(W: Tensor, V: Tensor, T: Tensor, transpose: bool, out: Tensor) -> Tensor:
    if not torch.compiler.is_compiling():
        return forward(W, V, T, transpose, out)
    if out is W:
        return torch.ops.mose_triton.apply_fwd_(W, V, T, transpose)
    return torch.ops.mose_triton.apply_fwd(W, V, T, transpose, out)


def _op_backward(
    dY: Tensor, W: Tensor, V: Tensor, T: Tensor, X: Tensor, transpose: bool, need_dW: bool, need_dV: bool
) -> tuple[Tensor | None, Tensor | None]:
    if not torch.compiler.is_compiling():
        return backward(dY, W, V, T, X, transpose, need_dW, need_dV)
    dW, dV = torch.ops.mose_triton.apply_bwd(dY, W, V, T, X, transpose, need_dW, need_dV)
    return (dW if need_dW else None), (dV if need_dV else None)


def load_backend() -> Backend | None:
    """The Triton backend, or ``None`` when Triton cannot run here (no GPU and no interpreter)."""
    if torch.cuda.is_available():
        devices = frozenset({"cuda"})
    elif os.environ.get("TRITON_INTERPRET") == "1":
        devices = frozenset({"cpu"})
    else:
        logger.debug("triton backend unavailable: no CUDA device and TRITON_INTERPRET is not 1")
        return None
    return Backend(
        name="triton",
        devices=devices,
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        factor=_op_factor,
        forward=_op_forward,
        backward=_op_backward,
    )
