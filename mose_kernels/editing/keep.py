"""Keep subspaces: directions an edit's Householder vectors must avoid.

A reflection ``H = I - 2 v v^T / (v^T v)`` fixes every vector orthogonal to ``v``. Restricting an
edit's vectors to the orthogonal complement of a subspace ``P`` therefore leaves ``W`` unchanged
on ``P`` *exactly* (input side: ``W Q^T k = W k`` for ``k`` in ``P``). ``P`` holds the top
principal directions of a sample corpus (fixed) and earlier edits' keys (grown edit by edit,
compressed by energy when it reaches its capacity).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def principal_directions(samples: Tensor, count: int) -> Tensor:
    """``(n, count)`` orthonormal top eigenvectors of the second moment of ``samples`` (rows)."""
    x = samples.detach().double().reshape(-1, samples.shape[-1])
    count = min(count, *x.shape)
    if count == 0:
        return x.new_zeros(x.shape[-1], 0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[:count].T.contiguous()


@dataclass(frozen=True)
class KeepSubspace:
    """An immutable keep subspace of ``R^n`` (float64, CPU); ``add`` returns a new one.

    Attributes:
        corpus: ``(n, c)`` orthonormal corpus directions.
        edits: ``(n, e)`` orthonormal edit-key directions, orthogonal to ``corpus``.
        energy: ``(e,)`` singular value each edit direction entered with (compression order).
        max_dim: most directions in total; adding beyond it drops the weakest edit directions.
        tol: relative threshold of a new direction (fraction of the batch's top singular value).
    """

    corpus: Tensor
    edits: Tensor
    energy: Tensor
    max_dim: int
    tol: float = 1e-3

    @classmethod
    def empty(cls, n: int, *, capacity: float = 0.75, tol: float = 1e-3) -> KeepSubspace:
        z = torch.zeros(n, 0, dtype=torch.float64)
        return cls(z, z.clone(), torch.zeros(0, dtype=torch.float64), int(capacity * n), tol)

    @property
    def n(self) -> int:
        return self.corpus.shape[0]

    @property
    def dim(self) -> int:
        return self.corpus.shape[1] + self.edits.shape[1]

    @property
    def basis(self) -> Tensor:
        """``(n, dim)`` orthonormal basis of the whole subspace."""
        return torch.cat([self.corpus, self.edits], dim=1)

    def with_corpus(self, samples: Tensor, count: int) -> KeepSubspace:
        """Replace the corpus directions by the top ``count`` of ``samples`` (edits re-projected)."""
        corpus = principal_directions(samples, min(count, self.max_dim))
        edits, energy = self.edits, self.energy
        if edits.shape[1]:
            keep = KeepSubspace(corpus, edits[:, :0], energy[:0], self.max_dim, self.tol)
            return keep.add((edits * energy).T)
        return KeepSubspace(corpus, edits, energy, self.max_dim, self.tol)

    def project_out(self, x: Tensor) -> Tensor:
        """Rows of ``x`` minus their component in the subspace (same dtype and device as ``x``)."""
        if self.dim == 0:
            return x
        b = self.basis.to(device=x.device, dtype=x.dtype)
        return x - (x @ b) @ b.T

    def add(self, keys: Tensor) -> KeepSubspace:
        """Subspace grown by the span of ``keys`` (rows; components below ``tol`` are ignored)."""
        x = keys.detach().double().cpu().reshape(-1, self.n)
        if x.shape[0] == 0:
            return self
        scale = torch.linalg.matrix_norm(x, ord=2)
        if scale == 0:
            return self
        for _ in range(2):  # re-orthogonalise once: classical Gram-Schmidt loses orthogonality
            x = self.project_out(x)
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        new = s > self.tol * scale
        edits = torch.cat([self.edits, vh[new].T], dim=1)
        energy = torch.cat([self.energy, s[new]])
        room = self.max_dim - self.corpus.shape[1]
        if edits.shape[1] > room:
            order = torch.argsort(energy, descending=True)[: max(room, 0)]
            logger.info("keep subspace full (%d dims): dropping %d weakest edit directions",
                        self.max_dim, edits.shape[1] - order.numel())
            edits, energy = edits[:, order], energy[order]
        return KeepSubspace(self.corpus, edits.contiguous(), energy, self.max_dim, self.tol)

    def residual_fraction(self, x: Tensor) -> float:
        """``||x - P x|| / ||x||``: how much of ``x`` an edit restricted to the complement can see."""
        x64 = x.detach().double().cpu().reshape(-1, self.n)
        norm = torch.linalg.vector_norm(x64)
        return 0.0 if norm == 0 else float(torch.linalg.vector_norm(self.project_out(x64)) / norm)

    def state_dict(self) -> dict[str, Tensor]:
        return {"corpus": self.corpus, "edits": self.edits, "energy": self.energy}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], max_dim: int, tol: float) -> KeepSubspace:
        return cls(state["corpus"].double(), state["edits"].double(), state["energy"].double(), max_dim, tol)
