"""Memory of MOSE edits on a full-size bf16 LLaMA-3-8B (random weights) on the CPU.

The issue's claim to check: an edit of a bf16 LLaMA-3-8B fits in the memory of the model plus
``O(n k)`` per edited layer, never ``O(n^2)``. The model (LLaMA-3-8B's config, 32 layers, random
bf16 weights, 16 GB) is built on the CPU, then the editor with the LLaMA-3-8B preset is created
and ``--edits`` sequential edits are made. Reported, beside the model's size:

- the resident-set increase of building the editor (fp32 masters of the edited layers, the keep
  corpus's activations and principal directions) and the peak increase during each edit
  (``bench/measure.py``: ``VmHWM`` reset through ``/proc/self/clear_refs``, with
  ``MALLOC_MMAP_THRESHOLD_`` set so freed blocks return to the system);
- the bytes of the state the editor keeps: fp32 masters, keep subspaces, corpus activations;
- what one dense ``n x n`` orthogonal matrix per layer would take, for scale.

Random weights: the edits need not take (efficacy is not measured), and ``--steps`` (default 5)
bounds the time; the memory of a step does not depend on how many are taken.

    OMP_NUM_THREADS=1 python -m bench.edit_memory --edits 3 --out bench/results/cpu-edit-memory-llama3-8b.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import measure
from bench.editing_throughput import edit_requests, load_bench_model
from mose_kernels.editing import MoseEditor
from mose_kernels.editing.config import preset_for

MIB = 2**20


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.edit_memory", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3-8b-random", help="llama3-8b-random (default) or tiny-llama")
    p.add_argument("--edits", type=int, default=3, help="sequential edits")
    p.add_argument("--steps", type=int, default=5, help="optimisation steps per edit (bounds the time)")
    p.add_argument("--no-master", action="store_true", help="keep_fp32_master=False (the memory opt-out)")
    p.add_argument("--out", type=Path, help="JSON file to write")
    return p.parse_args(argv)


def _rss() -> int:
    return measure._proc_status_bytes("VmRSS") or 0


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors reachable through dicts, lists and dataclass-like objects (one level)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(_tensor_bytes(v) for v in vars(obj).values() if isinstance(v, torch.Tensor))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # see bench/measure.py
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, "-m", "bench.edit_memory", *argv], env)
    args = _parse_args(argv)
    started = time.perf_counter()
    rss0 = _rss()
    model, tok, dtype = load_bench_model(args.model, torch.device("cpu"))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_model = _rss()
    print(f"model {args.model}: {model_bytes / MIB:,.0f} MiB of {dtype} parameters (resident "
          f"+{(rss_model - rss0) / MIB:,.0f} MiB), built in {time.perf_counter() - started:.0f} s", flush=True)
    config = preset_for(model).to_dict()
    config.update(steps=args.steps, keep_fp32_master=not args.no_master)
    requests, source = edit_requests(args.edits)
    built: list[MoseEditor] = []
    editor_peak = measure.peak_extra_memory(lambda: built.append(MoseEditor(model, tok, config)), torch.device("cpu"))
    editor = built[0]
    rss_editor = _rss()
    n = editor.targets[0].dim(editor.config.side)
    print(f"editor: layers {editor.config.layers}, side {editor.config.side}, n = {n}, "
          f"k = {editor.config.num_reflections}; resident +{(rss_editor - rss_model) / MIB:,.0f} MiB, "
          f"peak +{(editor_peak or 0) / MIB:,.0f} MiB while building", flush=True)
    rows = []
    for i, request in enumerate(requests):
        rss_before = _rss()
        done: list = []
        t0 = time.perf_counter()
        peak = measure.peak_extra_memory(lambda r=request, d=done: d.append(editor.edit(r)[0]), torch.device("cpu"))
        result = done[0]
        row = {"edit": i, "seconds": time.perf_counter() - t0, "steps": result.steps,
               "peak_extra_mib": None if peak is None else peak / MIB,
               "resident_after_mib": (_rss() - rss_model) / MIB, "resident_growth_mib": (_rss() - rss_before) / MIB}
        rows.append(row)
        print(f"edit {i}: {row['steps']} steps, {row['seconds']:.0f} s, peak +{row['peak_extra_mib']:,.0f} MiB over "
              f"the resident set before it; resident now model + {row['resident_after_mib']:,.0f} MiB", flush=True)
    layers = len(editor.targets)
    state = {
        "fp32_masters_mib": _tensor_bytes(editor._masters) / MIB,
        "keep_subspaces_mib": _tensor_bytes(list(editor._keep.values())) / MIB,
        "corpus_activations_mib": _tensor_bytes(editor._corpus_acts or {}) / MIB,
        "journal_vectors_mib": sum(_tensor_bytes(e.vectors) for e in editor.journal) / MIB,
    }
    doc = {
        "bench": "edit_memory", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "command": "python -m bench.edit_memory " + " ".join(argv),
        "machine": measure.machine_info(torch.device("cpu")),
        "memory_method": measure.CPU_MEMORY_METHOD, "model": args.model, "dtype": str(dtype).replace("torch.", ""),
        "requests": source, "model_mib": model_bytes / MIB, "editor_config": editor.config.to_dict(),
        "n": n, "layers": layers, "editor_build_peak_mib": None if editor_peak is None else editor_peak / MIB,
        "editor_resident_mib": (rss_editor - rss_model) / MIB, "edits": rows, "state": state,
        "dense_q_per_layer_fp32_mib": n * n * 4 / MIB,
        "vectors_per_edit_fp32_mib": layers * editor.config.num_reflections * n * 4 / MIB,
        "wall_s": time.perf_counter() - started,
    }
    shown = ("model_mib", "editor_resident_mib", "state", "dense_q_per_layer_fp32_mib")
    print(json.dumps({k: doc[k] for k in shown}, indent=1))
    if args.out:
        _write_atomic(args.out, doc)
        print(f"wrote {args.out}")
    return 0


def _write_atomic(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
