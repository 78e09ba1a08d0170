"""Keep-subspace memory and time at 7B-70B widths, with and without ``keep_max_dim``.

A layer's keep subspace is stored in float64 as ``n x dim`` directions plus a ``dim x dim``
moment, so a cap at a fraction of ``n`` (``keep_capacity``, default 0.75) grows with ``n^2``;
``keep_max_dim`` bounds it. This script feeds a :class:`KeepSubspace` the keys of ``--edits``
synthetic edits (``--keys`` Gaussian rows each, about what one CounterFact prompt + target gives)
and reports per run: the stored bytes when full, the median and largest seconds of one ``add``
(the largest is a compression: an eigendecomposition of the ``dim x dim`` moment), and the
seconds to feed every edit. Widths: LLaMA-3-8B down_proj input 14336, LLaMA-3-70B 28672.

    OMP_NUM_THREADS=1 python -m bench.keep_memory --n 14336 --max-dim 4096 --edits 500
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.measure import emit_json_line
from mose_kernels.editing.keep import KeepSubspace


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.keep_memory", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=14336, help="vector width (the edited side of the projection)")
    p.add_argument("--max-dim", type=int, default=None, help="keep_max_dim (default: 0.75 n, no cap)")
    p.add_argument("--edits", type=int, default=500, help="edits fed one after another")
    p.add_argument("--keys", type=int, default=9, help="key rows per edit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    return p.parse_args(argv)


def stored_bytes(keep: KeepSubspace) -> int:
    """Bytes of what the journal stores for one layer (``state_dict``)."""
    return sum(t.numel() * t.element_size() for t in keep.state_dict().values())


def run(n: int, max_dim: int | None, edits: int, keys: int, seed: int = 0) -> dict:
    """Feed ``edits`` batches of ``keys`` random rows; the measurements of the module doc."""
    keep = KeepSubspace.empty(n, max_dim=max_dim)  # None: the default 0.75 n room
    gen = torch.Generator().manual_seed(seed)
    seconds, peak = [], 0
    start = time.perf_counter()
    for _ in range(edits):
        batch = torch.randn(keys, n, generator=gen, dtype=torch.float64)
        t0 = time.perf_counter()
        keep = keep.add(batch)
        seconds.append(time.perf_counter() - t0)
        peak = max(peak, stored_bytes(keep))
    total = time.perf_counter() - start
    return {
        "n": n, "max_dim": keep.max_dim, "edits": edits, "keys_per_edit": keys, "final_dim": keep.dim,
        "peak_stored_mib": round(peak / 2**20, 1), "median_add_s": round(statistics.median(seconds), 4),
        "max_add_s": round(max(seconds), 2), "total_s": round(total, 1), "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.max_dim is not None and not 0 < args.max_dim <= args.n:
        print(f"keep_memory: --max-dim must be in 1..{args.n}, got {args.max_dim}", file=sys.stderr)
        return 2
    emit_json_line(run(args.n, args.max_dim, args.edits, args.keys, args.seed), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
