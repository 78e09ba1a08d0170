"""Keep subspaces: directions an edit's Householder vectors must avoid.

A reflection ``H = I - 2 v v^T / (v^T v)`` fixes every vector orthogonal to ``v``. Restricting an
edit's vectors to the orthogonal complement of a subspace ``P`` therefore leaves ``W`` unchanged
on ``P`` *exactly* (input side: ``W Q^T k = W k`` for ``k`` in ``P``). ``P`` holds the top
principal directions of a sample corpus (fixed) and earlier edits' keys (grown edit by edit).

Capacity: a hard subspace fills ``R^n`` (about 9 directions per edit at every prompt and target
position), so the edit part is an incremental PCA. It carries the second moment of every key it
was fed, in its own basis; once it holds more than ``max_dim`` directions it is rotated to that
moment's eigenvectors and the least energetic ones are released, down to 90 % of the room (so
the eigendecomposition, ``O(e^3)``, runs once per ~10 % of capacity filled, not at every edit).
What is kept is the best summary of that rank of all earlier edits' keys, in energy, so old edits
lose protection a little each, in proportion to how little of their keys the dropped directions
carried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def principal_directions(samples: Tensor, count: int, *, exact_limit: int = 4096) -> Tensor:
    """``(n, count)`` orthonormal top eigenvectors of the second moment of ``samples`` (rows).

    Exact while ``min(rows, n) <= exact_limit``: from the smaller Gram matrix (``x^T x`` or
    ``x x^T``) in float64, ~3x faster than an SVD of a 5700 x 1536 corpus. Beyond it (a corpus of
    many thousand tokens at 7B-70B widths, where that Gram matrix is ``n x n`` and its
    eigendecomposition takes minutes) a randomized SVD (``torch.svd_lowrank``, 16 extra columns,
    6 power iterations) in the samples' dtype, ``O((rows + n) count)`` memory, re-orthonormalised
    in float64.
    """
    x = samples.detach().reshape(-1, samples.shape[-1])
    count = min(count, *x.shape)
    if count == 0:
        return x.new_zeros(x.shape[-1], 0, dtype=torch.float64)
    if min(x.shape) > exact_limit:
        q = min(count + 16, *x.shape)
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # no half-precision QR on the CPU
        v = torch.svd_lowrank(x, q=q, niter=6)[2][:, :count]
        return torch.linalg.qr(v.double())[0].contiguous()
    x = x.double()
    if x.shape[0] >= x.shape[1]:
        return torch.linalg.eigh(x.T @ x)[1][:, -count:].flip(1).contiguous()
    top = torch.linalg.eigh(x @ x.T)[1][:, -count:].flip(1)
    return torch.linalg.qr(x.T @ top)[0].contiguous()


@dataclass(frozen=True)
class KeepSubspace:
    """An immutable keep subspace of ``R^n`` (float64, CPU); ``add`` returns a new one.

    Attributes:
        corpus: ``(n, c)`` orthonormal corpus directions.
        edits: ``(n, e)`` orthonormal edit-key directions, orthogonal to ``corpus``.
        moment: ``(e, e)`` second moment ``sum_k (E^T k)(E^T k)^T`` of every key added so far,
            in the ``edits`` basis ``E`` (the compression statistics).
        max_dim: most directions in total; beyond it the edit part is compressed (module doc).
        tol: relative threshold of a new direction (fraction of the batch's top singular value).
        released: edit directions released by compression so far (``0``: every key added is
            still held, up to ``tol``).
    """

    corpus: Tensor
    edits: Tensor
    moment: Tensor
    max_dim: int
    tol: float = 1e-3
    released: int = 0

    @classmethod
    def empty(cls, n: int, *, capacity: float = 0.75, max_dim: int | None = None, tol: float = 1e-3) -> KeepSubspace:
        """An empty subspace of ``R^n`` holding at most ``max_dim`` directions (default ``capacity * n``)."""
        z = torch.zeros(n, 0, dtype=torch.float64)
        room = int(capacity * n) if max_dim is None else int(max_dim)
        if not 0 <= room <= n:
            raise ValueError(f"a keep subspace of R^{n} holds 0 to {n} directions, got max_dim {room}")
        return cls(z, z.clone(), torch.zeros(0, 0, dtype=torch.float64), room, tol)

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
        fresh = KeepSubspace(corpus, self.edits[:, :0], self.moment[:0, :0], self.max_dim, self.tol, self.released)
        if not self.edits.shape[1]:
            return fresh
        evals, evecs = torch.linalg.eigh(self.moment)  # keys with the same second moment
        return fresh.add((self.edits @ evecs * evals.clamp_min(0).sqrt()).T)

    def project_out(self, x: Tensor) -> Tensor:
        """Rows of ``x`` minus their component in the subspace (same dtype and device as ``x``).

        The corpus and edit parts are orthogonal, so each is taken out on its own: no ``n x dim``
        concatenated basis is built (at 7B-70B widths that copy cost more than the products).
        """
        for part in (self.corpus, self.edits):
            if part.shape[1]:
                b = part.to(device=x.device, dtype=x.dtype)
                x = x - (x @ b) @ b.T
        return x

    def add(self, keys: Tensor, *, compress: bool = True) -> KeepSubspace:
        """Subspace grown by the span of ``keys`` (rows; components below ``tol`` are ignored),
        compressed to ``max_dim`` directions when it would exceed them (unless ``compress`` is
        false: a temporary subspace for one edit, never stored)."""
        x = keys.detach().double().cpu().reshape(-1, self.n)
        if x.shape[0] == 0:
            return self
        scale = torch.linalg.matrix_norm(x, ord=2)
        if scale == 0:
            return self
        resid = x
        for _ in range(2):  # re-orthogonalise once: classical Gram-Schmidt loses orthogonality
            resid = self.project_out(resid)
        _, s, vh = torch.linalg.svd(resid, full_matrices=False)
        edits = torch.cat([self.edits, vh[s > self.tol * scale].T], dim=1)
        coords = x @ edits
        e_old = self.edits.shape[1]
        moment = coords.T @ coords
        moment[:e_old, :e_old] += self.moment
        room = max(self.max_dim - self.corpus.shape[1], 0)
        released = self.released
        if compress and edits.shape[1] > room:
            kept = room - max(1, room // 10) if room > 1 else room  # hysteresis (module doc)
            evals, evecs = torch.linalg.eigh(moment)
            top = torch.flip(evecs[:, evecs.shape[1] - kept :], dims=[1])
            logger.info("keep subspace full (%d dims): released %d edit directions carrying %.2e of the "
                        "keys' energy", self.max_dim, edits.shape[1] - kept,
                        float(evals[: evals.numel() - kept].clamp_min(0).sum() / evals.sum().clamp_min(1e-300)))
            released += edits.shape[1] - kept
            edits = edits @ top  # orthonormal: a product of orthonormal column sets
            moment = torch.diag(torch.flip(evals[evals.numel() - kept :], dims=[0]))
        return KeepSubspace(self.corpus, edits.contiguous(), moment, self.max_dim, self.tol, released)

    def remove_last(self, count: int, keys: Tensor) -> KeepSubspace:
        """Inverse of the ``add(keys)`` that appended the last ``count`` edit directions (no
        compression since): drop them and take ``keys``' share out of the moment."""
        e = self.edits.shape[1] - count
        if e < 0:
            raise ValueError(f"cannot release {count} directions of a subspace holding {self.edits.shape[1]}")
        edits = self.edits[:, :e].contiguous()
        coords = keys.detach().double().cpu().reshape(-1, self.n) @ edits
        moment = self.moment[:e, :e] - coords.T @ coords
        return KeepSubspace(self.corpus, edits, moment, self.max_dim, self.tol, self.released)

    def residual_fraction(self, x: Tensor) -> float:
        """``||x - P x|| / ||x||``: how much of ``x`` an edit restricted to the complement can see."""
        x64 = x.detach().double().cpu().reshape(-1, self.n)
        norm = torch.linalg.vector_norm(x64)
        return 0.0 if norm == 0 else float(torch.linalg.vector_norm(self.project_out(x64)) / norm)

    def state_dict(self) -> dict[str, Tensor]:
        return {"corpus": self.corpus, "edits": self.edits, "moment": self.moment,
                "released": torch.tensor(self.released, dtype=torch.int64)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], max_dim: int, tol: float) -> KeepSubspace:
        """Inverse of :meth:`state_dict`; also reads older forms: the ``energy`` of a diagonal
        moment, and no ``released`` count (read as none released)."""
        moment = state["moment"].double() if "moment" in state else torch.diag(state["energy"].double() ** 2)
        released = int(state["released"]) if "released" in state else 0
        return cls(state["corpus"].double(), state["edits"].double(), moment, max_dim, tol, released)
