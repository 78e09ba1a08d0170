"""Earlier edits' keys per edited layer: what the ``edit_keys_weight`` penalty holds.

A layer up to ``GRAM_MAX_DIM`` wide keeps the exact second moment ``X^T X`` of every key seen
(float64, n x n): exact, and the penalty's cost per step does not grow with the number of edits.
A wider layer (the input side of a 7B-70B down projection, n = 14336-28672) keeps a uniform
sample of at most ``KEY_BANK_ROWS`` keys instead (reservoir sampling, seeded), whose memory is
bounded by the sample rather than by n^2.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from mose_kernels.editing.solvers.penalty import HeldOutputs

GRAM_MAX_DIM = 4096  # up to here n x n float64 takes no more memory than the row sample
KEY_BANK_ROWS = 8192  # keys per layer sampled for wider layers


@dataclass(frozen=True)
class KeyBank:
    """Immutable: :meth:`added` returns a new bank, so a failed edit keeps the old one."""

    grams: dict[str, Tensor]
    rows: dict[str, Tensor]
    seen: int
    seed: int

    @classmethod
    def empty(cls, dims: Mapping[str, int], seed: int) -> KeyBank:
        """A bank for layers of the given vector dimensions (``EditTarget.dim(side)``)."""
        grams = {name: torch.zeros(d, d, dtype=torch.float64) for name, d in dims.items() if d <= GRAM_MAX_DIM}
        rows = {name: torch.zeros(0, d) for name, d in dims.items() if d > GRAM_MAX_DIM}
        return cls(grams, rows, 0, seed)

    def added(self, keys: Mapping[str, Tensor]) -> KeyBank:
        """The bank with ``keys`` (per layer, (count, n), the same count for every layer) added."""
        layers = set(self.grams) | set(self.rows)
        if set(keys) != layers:
            raise ValueError(f"keys must cover the bank's layers {sorted(layers)}, got {sorted(keys)}")
        counts = {k.shape[0] for k in keys.values()}
        if len(counts) > 1:
            raise ValueError(f"every layer needs the same number of keys, got {sorted(counts)}")
        count = counts.pop() if counts else 0
        grams = {}
        for name, gram in self.grams.items():
            x = keys[name].to(torch.float64).cpu()
            grams[name] = gram + x.T @ x
        rows = {name: self._sampled(bank, keys[name].float().cpu()) for name, bank in self.rows.items()}
        return KeyBank(grams, rows, self.seen + count, self.seed)

    def _sampled(self, bank: Tensor, new: Tensor) -> Tensor:
        """``bank`` with ``new`` added: every row while there is room, then each later row
        replaces a uniformly drawn slot with probability ``KEY_BANK_ROWS / rows seen``."""
        kept = torch.cat([bank, new[: max(0, KEY_BANK_ROWS - bank.shape[0])]])
        gen = torch.Generator().manual_seed(self.seed + self.seen)
        for j in range(kept.shape[0] - bank.shape[0], new.shape[0]):  # rows that found no free slot
            slot = int(torch.randint(0, self.seen + j + 1, (1,), generator=gen))
            if slot < KEY_BANK_ROWS:
                kept[slot] = new[j]
        return kept

    def held(self) -> dict[str, HeldOutputs]:
        """Per layer, the keys as the penalty takes them; empty before the first edit."""
        if self.seen == 0:
            return {}
        return {**{n: HeldOutputs(gram=g) for n, g in self.grams.items()},
                **{n: HeldOutputs(rows=r) for n, r in self.rows.items()}}
