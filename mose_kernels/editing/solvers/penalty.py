"""The output-change penalty: how much an edit's rotation ``Q = H(v_1)...H(v_k) = I - V^T T V``
(compact WY form) changes the outputs of vectors it should leave alone, never forming an
``n x n`` matrix.

The vectors are held either as rows ``X`` (r, n) or only as their second moment ``G = X^T X``
(n, n). The penalty is quadratic in the vectors, so ``G`` is all it needs: with ``P = V G V^T``
(k x k) the change costs ``O(n^2 k)`` per step however many vectors ``G`` sums, where the rows
cost ``O(r n k)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mose_kernels.reference import wy_factor_ref

SIDES = ("input", "output")


@dataclass(frozen=True)
class HeldOutputs:
    """Vectors whose outputs a penalty holds: ``rows`` (r, n) or their ``gram`` ``X^T X`` (n, n)."""

    rows: torch.Tensor | None = None
    gram: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.rows is None) == (self.gram is None):
            raise ValueError("HeldOutputs takes exactly one of rows (r, n) or gram (n, n)")
        if self.gram is not None and (self.gram.ndim != 2 or self.gram.shape[0] != self.gram.shape[1]):
            raise ValueError(f"HeldOutputs.gram must be square (n, n), got {tuple(self.gram.shape)}")
        if self.rows is not None and self.rows.ndim != 2:
            raise ValueError(f"HeldOutputs.rows must be (r, n), got {tuple(self.rows.shape)}")

    @property
    def empty(self) -> bool:
        return self.rows.shape[0] == 0 if self.rows is not None else not bool(self.gram.any())

    def to(self, device, dtype: torch.dtype = torch.float32) -> HeldOutputs:
        if self.rows is not None:
            return HeldOutputs(rows=self.rows.to(device=device, dtype=dtype))
        return HeldOutputs(gram=self.gram.to(device=device, dtype=dtype))

    def energy(self, weight: torch.Tensor, side: str) -> float:
        """The outputs' energy: ``sum ||W x||^2`` (input side; ``weight`` is (out, in)) or
        ``sum ||y||^2`` (output side, the vectors are outputs)."""
        _check_side(side)
        if self.rows is not None:
            return float((self.rows @ weight.T).pow(2).sum()) if side == "input" else float(self.rows.pow(2).sum())
        if side == "input":
            return float(((weight @ self.gram) * weight).sum())
        return float(self.gram.diagonal().sum())

    def change(self, V: torch.Tensor, weight: torch.Tensor, side: str) -> torch.Tensor:
        """``sum ||W (Q^T x - x)||^2`` (input side) or ``sum ||Q y - y||^2`` (output side),
        differentiable in ``V`` (k, n). A row's change is ``(x V^T) T (V W^T)`` (input) or
        ``(y V^T) T^T V`` (output)."""
        _check_side(side)
        T = wy_factor_ref(V)
        if self.rows is not None:
            coeffs = self.rows @ V.T
            if side == "input":
                return ((coeffs @ T) @ (V @ weight.T)).pow(2).sum()
            return ((coeffs @ T.T) @ V).pow(2).sum()
        moment = V @ self.gram @ V.T  # sum over the vectors of (V x)(V x)^T
        if side == "input":
            B = V @ weight.T
            return ((T @ (B @ B.T) @ T.T) * moment).sum()
        return ((T.T @ (V @ V.T) @ T) * moment).sum()


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
