"""Where an edit's time goes: cProfile of sequential MOSE edits on SmolLM2-135M (CPU).

Prints, per edit, the optimisation steps and seconds, then the mean time per edit of the phases
that matter (the model's forward passes, the backward passes, the commit, the key capture) and the
top of the cumulative profile. The issue notes' numbers were measured as
``OMP_NUM_THREADS=2 python -m bench.edit_profile --edits 12``.

The first edit (which also builds the keep subspace's corpus directions) runs unprofiled. Data:
``counterfact-edit.json`` from ``../shared/data`` (or ``MOSE_SHARED_DATA``); the keep corpus is the
``prompt + ground_truth`` of records 2000-2299, as in ``bench/editing_levers.py``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys

import torch

from bench.editing_throughput import counterfact_corpus, counterfact_edit_file
from mose_kernels.editing import MoseEditor, load_requests
from mose_kernels.evaluation.models import load_model

# (label, function name as cProfile records it, file suffix)
PHASES = (
    ("forward (target loss)", "target_nll", "solvers/common.py"),
    ("backward", "backward", "torch/autograd/__init__.py"),
    ("commit", "_commit", "editing/editor.py"),
    ("key capture", "_edit_keys", "editing/editor.py"),
)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.edit_profile", description=__doc__.splitlines()[0])
    p.add_argument("--edits", type=int, default=12, help="sequential edits (the first is not profiled)")
    p.add_argument("--config", default="{}", help="JSON object of EditConfig fields over the SmolLM2 preset")
    p.add_argument("--top", type=int, default=25, help="rows of the cumulative profile to print")
    return p.parse_args(argv)


def phase_seconds(stats: pstats.Stats) -> dict[str, tuple[int, float]]:
    """``label -> (calls, cumulative seconds)`` of :data:`PHASES` in a profile."""
    out = {}
    for label, func, suffix in PHASES:
        calls, total = 0, 0.0
        for (path, _, name), (_, ncalls, _, cumtime, _) in stats.stats.items():
            if name == func and path.replace("\\", "/").endswith(suffix):
                calls, total = calls + ncalls, total + cumtime
        out[label] = (calls, total)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    data = counterfact_edit_file("edit_profile")
    if data is None:
        return 2
    if args.edits < 2:
        print("edit_profile: --edits must be at least 2 (the first edit is not profiled)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    requests = load_requests(data)[: args.edits]
    config = json.loads(args.config)
    config.setdefault("keep_corpus", counterfact_corpus(data))
    editor = MoseEditor(model, tok, config)
    editor.edit(requests[0])
    profile, seconds, steps = cProfile.Profile(), [], []
    profile.enable()
    for request in requests[1:]:
        result = editor.edit(request)[0]
        seconds.append(result.seconds)
        steps.append(result.steps)
    profile.disable()
    edits = len(seconds)
    print(f"torch threads {torch.get_num_threads()}; {edits} profiled edits")
    print("steps per edit: " + ", ".join(map(str, steps)) + f" (mean {statistics.mean(steps):.1f})")
    print("seconds per edit: " + ", ".join(f"{s:.2f}" for s in seconds)
          + f" (median {statistics.median(seconds):.2f})")
    stats = pstats.Stats(profile)
    for label, (calls, total) in phase_seconds(stats).items():
        per_call = total / calls if calls else float("nan")
        print(f"{label:24s} {calls:5d} calls  {total / edits:6.3f} s per edit  {per_call:6.3f} s per call")
    stats.sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
