"""Test helpers shared by the test suite and the benchmarks: one tolerance table by dtype,
a relative-error assert, and input makers."""

from __future__ import annotations

import torch
from torch import Tensor

# Relative RMS error ||got - ref||_F / ||ref||_F allowed for a Householder apply whose result is
# stored in this dtype (ref computed in float64). Half precision: one rounding to nearest on store
# is at most 2^-9 (bf16) / 2^-12 (fp16) relative (half an ulp); measured on Gaussian data: 1.66e-3
# (bf16) and 2.08e-4 (fp16) relative RMS, so the table leaves a ~2.4x margin.
# float32/float64: accumulation over n terms, scaled in `tolerance`.
RELATIVE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 2e-7,
    torch.float16: 5e-4,
    torch.bfloat16: 4e-3,
}
# Triton on a GPU runs tl.dot in tf32 for float32 inputs (10-bit mantissa).
GPU_TF32_TOLERANCE = 5e-3


def tolerance(dtype: torch.dtype, n: int = 1, k: int = 1) -> float:
    """Relative RMS tolerance for a product of ``k`` reflections of length ``n`` stored in ``dtype``.

    Single and double precision scale with ``sqrt(max(n, k))`` (accumulation length) and, when
    ``k > n``, with ``k / n``: more reflections than dimensions are linearly dependent, and the
    triangular ``T`` grows ill-conditioned (measured: n = 7, k = 65 loses ~30 ulps in float32).
    Half precision is dominated by the one rounding on store.
    """
    base = RELATIVE_TOLERANCE[dtype]
    if dtype in (torch.float32, torch.float64):
        return base * max(1.0, float(max(n, k)) ** 0.5) * max(1.0, k / max(n, 1))
    return base


def relative_error(got: Tensor, ref: Tensor, floor: float = 0.0) -> float:
    """``||got - ref||_F / max(||ref||_F, floor)`` in float64 (0 when both are empty or zero).
    ``floor``: the scale below which ``ref`` counts as zero (a gradient that vanishes in exact
    arithmetic is rounding noise of its inputs' size, not a quantity to match relatively)."""
    got64, ref64 = got.detach().double(), ref.detach().double()
    denom = max(torch.linalg.vector_norm(ref64).item(), floor)
    diff = torch.linalg.vector_norm(got64 - ref64).item()
    if denom == 0.0:
        return diff
    return diff / denom


def assert_close(name: str, ref: Tensor, got: Tensor, rtol: float, floor: float = 0.0) -> None:
    """Assert a relative RMS error below ``rtol`` (see :func:`relative_error` for ``floor``); the
    message names the tensor and the numbers."""
    if got.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(got).all():
        raise AssertionError(f"{name}: non-finite values in the result")
    err = relative_error(got, ref, floor)
    if not err <= rtol:
        max_abs = (got.detach().double() - ref.detach().double()).abs().max().item()
        raise AssertionError(f"{name}: relative error {err:.3e} > {rtol:.1e} (max abs diff {max_abs:.3e})")


def make_vectors(
    k: int, n: int, *, batch: tuple[int, ...] = (), dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu", generator: torch.Generator | None = None,
) -> Tensor:
    """Random Householder vectors (rows), Gaussian: well conditioned, norm ~ sqrt(n)."""
    return torch.randn(*batch, k, n, dtype=dtype, device=device, generator=generator)


def make_weight(
    rows: int, cols: int, *, batch: tuple[int, ...] = (), dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu", generator: torch.Generator | None = None,
) -> Tensor:
    """Random weight matrix with entries of unit variance."""
    return torch.randn(*batch, rows, cols, dtype=torch.float32, device=device, generator=generator).to(dtype)
