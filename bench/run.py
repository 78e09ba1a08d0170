"""``python -m bench``: time every provider on the same inputs, write JSON, print the table.

Default (CPU, fp32): the five model shapes, k in {1, 4, 16, 64, 256}; ``wy_factor``; ``fwd`` and
``fwd_inplace`` on both sides; ``bwd_V`` and ``bwd_VW`` on the right side (the input-side edit of an
``nn.Linear`` weight; ``--bwd-sides left,right`` adds the other). Rows whose estimated time per call
exceeds ``--max-call-s`` or whose estimated extra memory exceeds ``--mem-cap-gb`` are not run: the
estimate is recorded and printed instead (status ``skipped``).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench import measure
from bench.lapack import to_lapack
from bench.registry import (
    BACKWARD_OPS,
    DTYPES,
    K_VALUES,
    OPS,
    QUICK_K_VALUES,
    QUICK_SHAPES,
    SHAPES,
    Case,
    Ceilings,
    Inputs,
    Provider,
    floor_seconds,
    min_bytes,
    providers,
    wy_flops,
)
from mose_kernels import reference

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA = "mose-bench/1"
BASELINE = "torch_wy"
_ERROR_CHECK_MAX_NUMEL = 60_000_000  # float64 ground truth only where it fits comfortably
REDUCED_OPS = ("wy_factor", "fwd", "fwd_inplace", "bwd_V")
DTYPES_BY_NAME = {str(d).replace("torch.", ""): d for d in DTYPES.values()}


@dataclass
class Config:
    """Everything that decides which rows run and how long each may take."""

    device: str = "cpu"
    dtypes: tuple[str, ...] = ("fp32",)
    shapes: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(SHAPES))
    ks: tuple[int, ...] = K_VALUES
    ops: tuple[str, ...] = tuple(OPS)
    fwd_sides: tuple[str, ...] = ("left", "right")
    bwd_sides: tuple[str, ...] = ("right",)
    providers: tuple[str, ...] | None = None  # None: all
    reps: int = 5
    row_budget_s: float = 1.0
    slow_call_s: float = 0.25
    max_call_s: float = 6.0
    mem_cap_bytes: float = 4 * 2**30
    rotate_bytes: int = 128 * 2**20
    max_sets: int = 48
    ceiling_copy_bytes: int = 256 * 2**20
    ceiling_gemm_size: int = 2048
    check_errors: bool = True
    quick: bool = False
    # Shapes larger than this (elements of W) run only REDUCED_OPS on the right side unless full.
    reduced_above: int = 60_000_000
    full: bool = False
    threads: int | None = None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def plan(config: Config) -> list[Case]:
    """Cases in the order they run: shape, k, op, side, dtype."""
    cases = []
    for (shape, (n, m)), k, op, dtype_name in itertools.product(
        config.shapes.items(), config.ks, config.ops, config.dtypes
    ):
        if k > n:
            continue
        reduced = not config.full and n * m > config.reduced_above
        if reduced and op not in REDUCED_OPS:
            continue
        if op == "wy_factor":
            sides: tuple[str, ...] = ("left",)
        elif reduced:
            sides = ("right",)
        elif op in BACKWARD_OPS:
            sides = config.bwd_sides
        else:
            sides = config.fwd_sides
        cases.extend(Case(op, shape, n, m, k, side, DTYPES[dtype_name]) for side in sides)
    return cases


def measure_ceilings(config: Config) -> Ceilings:
    """Copy bandwidth and GEMM rate per dtype on this machine, now."""
    device = config.torch_device
    copy = measure.measure_copy_bandwidth(device, config.ceiling_copy_bytes)
    gemm = {name: measure.measure_gemm_rate(device, DTYPES[name], config.ceiling_gemm_size)
            for name in dict.fromkeys(("fp32", *config.dtypes))}
    return Ceilings(copy_bytes_per_s=copy, gemm_flops_per_s=gemm)


def _make_sets(case: Case, config: Config, gen: torch.Generator) -> list[Inputs]:
    """Independent input sets, enough of them to exceed ``rotate_bytes`` (caches)."""
    per_set = case.n * case.m * case.elem
    count = 1 if case.op == "wy_factor" else max(1, min(config.max_sets, math.ceil(config.rotate_bytes / per_set)))
    device = config.torch_device
    # One V for every set (it is small and cached anyway; rotating W is what defeats the caches),
    # so the LAPACK conversion runs once per case.
    V = torch.randn(case.k, case.n, generator=gen, device=device)
    return [Inputs(W=torch.randn(case.w_shape, generator=gen, device=device).to(case.dtype), V=V)
            for _ in range(count)]


def _with_lapack(sets: list[Inputs]) -> list[Inputs]:
    """Attach the LAPACK form of the (shared) V, converted once on the CPU in float64."""
    if sets[0].lapack is None:
        A, tau = to_lapack(sets[0].V.cpu())
        lapack = (A.to(sets[0].V.device, torch.float32), tau.to(sets[0].V.device, torch.float32))
        for inp in sets:
            inp.lapack = lapack
    return sets


def _ground_truth(case: Case, inp: Inputs):
    if case.op not in ("fwd", "fwd_inplace") or case.n * case.m > _ERROR_CHECK_MAX_NUMEL:
        return None
    return reference.householder_apply_wy(inp.W.double(), inp.V.double(), case.side, case.side == "right")


def _rotating(calls: list[Callable[[], object]]) -> Callable[[], object]:
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def _run_provider(case: Case, provider: Provider, sets: list[Inputs], config: Config, truth,
                  pristine: torch.Tensor, est_extra_bytes: float) -> dict:
    """Memory probe + warm-up, then timed calls rotating over the input sets."""
    device = config.torch_device
    fn = provider.fn(case)
    if provider.needs_lapack:
        sets = _with_lapack(sets)
    row: dict = {}
    probe_start = time.perf_counter()
    if case.op in BACKWARD_OPS:
        need_w = case.op == "bwd_VW"

        def graph(inp: Inputs):
            V = inp.V.detach().clone().requires_grad_(True)
            W = inp.W.detach().clone().requires_grad_(True) if need_w else inp.W
            y = fn(W, V, inp)
            return y, ([V, W] if need_w else [V])

        def fwd_bwd(inp: Inputs = sets[0]):
            y, leaves = graph(inp)
            return torch.autograd.grad(y, leaves, torch.ones_like(y))

        row["peak_extra_bytes"] = measure.peak_extra_memory(fwd_bwd, device)  # forward + backward
        # every retained graph holds the provider's saved tensors: keep them within the memory cap
        per_graph = max(row["peak_extra_bytes"] or 0, est_extra_bytes, 1)
        graphs = [graph(inp) for inp in sets[: max(1, int(config.mem_cap_bytes / 4 // per_graph))]]
        calls = []
        for y, leaves in graphs:
            dy = torch.randn_like(y)
            calls.append(lambda y=y, leaves=leaves, dy=dy: torch.autograd.grad(y, leaves, dy, retain_graph=True))
    else:
        if case.op == "fwd_inplace":  # sets[0].W may have been overwritten by an earlier provider
            probe_inp = Inputs(W=pristine.clone(), V=sets[0].V, lapack=sets[0].lapack)
        else:
            probe_inp = sets[0]
        out: list = []
        row["peak_extra_bytes"] = measure.peak_extra_memory(
            lambda: out.append(fn(probe_inp.W, probe_inp.V, probe_inp)), device
        )
        if truth is not None:
            from mose_kernels.testing import relative_error

            row["rel_err"] = relative_error(out[0], truth)
        out.clear()
        calls = [lambda inp=inp: fn(inp.W, inp.V, inp) for inp in sets]
    runner = _rotating(calls)
    if len(calls) > 1 or time.perf_counter() - probe_start < config.slow_call_s:
        runner()  # warm-up; a slow call's memory probe already warmed the same code path
    times = measure.time_calls(runner, device, reps=config.reps, budget_s=config.row_budget_s)
    row.update(times_s=times, reps=len(times), median_s=measure.median(times))
    return row


def run_kernels(config: Config, ceilings: Ceilings, *, rows: list[dict] | None = None,
                on_case: Callable[[], None] | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Every (case, provider) row of the plan, appended to ``rows``; ``on_case`` after each case."""
    device = config.torch_device
    available = [p for p in providers(device) if config.providers is None or p.name in config.providers]
    gen = torch.Generator(device=device).manual_seed(0)
    rows = [] if rows is None else rows
    for case in plan(config):
        sets: list[Inputs] | None = None
        truth = pristine = None
        case_rows = []
        for provider in available:
            if provider.supports(case, device) is not None:
                continue
            row = {"op": case.op, "shape": case.shape, "n": case.n, "m": case.m, "k": case.k,
                   "side": case.side if case.op != "wy_factor" else "-",
                   "dtype": str(case.dtype).replace("torch.", ""), "provider": provider.name}
            est_s, est_mem = provider.estimate(case, ceilings)
            row.update(est_s=est_s, est_extra_bytes=est_mem,
                       floor_s=floor_seconds(case, ceilings), min_bytes=min_bytes(case), wy_flops=wy_flops(case))
            if est_s > config.max_call_s or est_mem > config.mem_cap_bytes:
                row.update(status="skipped", reason=(
                    f"estimated {est_s:.3g} s per call and {est_mem / 2**30:.3g} GiB extra memory "
                    f"(limits {config.max_call_s:g} s, {config.mem_cap_bytes / 2**30:.3g} GiB)"))
            else:
                if sets is None:
                    if case.n * case.m > 1_000_000:
                        gc.collect()  # free the previous case's graphs before measuring memory
                    sets = _make_sets(case, config, gen)
                    truth = _ground_truth(case, sets[0]) if config.check_errors else None
                    pristine = sets[0].W.clone() if case.op == "fwd_inplace" else sets[0].W
                try:
                    row.update(_run_provider(case, provider, sets, config, truth, pristine, est_mem), status="ok")
                except (RuntimeError, ValueError, MemoryError) as exc:  # e.g. out of memory
                    logger.warning("%s failed on %s: %s", provider.name, case, exc)
                    row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
                if row["status"] == "ok":
                    t = row["median_s"]
                    row.update(gb_per_s=row["min_bytes"] / t / 1e9, gflop_per_s=row["wy_flops"] / t / 1e9,
                               pct_floor=100.0 * row["floor_s"] / t)
            case_rows.append(row)
            log(format_row(row))
        base = next((r for r in case_rows if r["provider"] == BASELINE and r["status"] == "ok"), None)
        for row in case_rows:
            if base is not None and row["status"] == "ok":
                row["speedup_vs_torch_wy"] = base["median_s"] / row["median_s"]
        rows.extend(case_rows)
        del sets, truth, pristine
        if on_case is not None:
            on_case()
    return rows


def format_row(row: dict) -> str:
    """One printed line per row."""
    head = (f"{row['op']:<11} {row['side']:<5} {row['shape']:<12} k={row['k']:<3} {row['dtype']:<8} "
            f"{row['provider']:<16}")
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row.get('reason', '')}"
    mem = row.get("peak_extra_bytes")
    mem_text = "n/a" if mem is None else f"{mem / 2**20:.1f} MiB"
    err = f" err {row['rel_err']:.1e}" if "rel_err" in row else ""
    return (f"{head} {row['median_s'] * 1e3:10.3f} ms  {row['gb_per_s']:7.2f} GB/s "
            f"{row['gflop_per_s']:8.2f} GFLOP/s {row['pct_floor']:6.2f}% floor  mem {mem_text}{err}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default fp32; cuda: bf16,fp32)")
    parser.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)} or n x m like 4096x1024")
    parser.add_argument("--ks", default=None, help="comma list of k (default 1,4,16,64,256)")
    parser.add_argument("--ops", default=None, help=f"comma list of {', '.join(OPS)}")
    parser.add_argument("--fwd-sides", default="left,right")
    parser.add_argument("--bwd-sides", default="right")
    parser.add_argument("--providers", default=None, help="comma list of provider names (default all)")
    parser.add_argument("--reps", type=int, default=None, help="max timed calls per row on CPU (default 5)")
    parser.add_argument("--row-budget-s", type=float, default=None, help="time budget of one row's timed calls")
    parser.add_argument("--max-call-s", type=float, default=None, help="skip rows estimated slower than this")
    parser.add_argument("--mem-cap-gb", type=float, default=None, help="skip rows estimated to need more")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice; --quick uses 1)")
    parser.add_argument("--quick", action="store_true", help="CI mode: small shapes, one repetition")
    parser.add_argument("--full", action="store_true",
                        help="every op and side on every shape (default: shapes above 60M elements run "
                             f"{', '.join(REDUCED_OPS)} on the right side only)")
    parser.add_argument("--editing", choices=("auto", "on", "off"), default="auto",
                        help="end-to-end editing throughput (auto: on for the default run, off with --quick)")
    parser.add_argument("--editing-model", default=None,
                        help="smollm2-135m (CPU default), llama3-8b-random (CUDA default) or tiny-llama")
    parser.add_argument("--editing-edits", type=int, default=None, help="edits per solver (default 5)")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel rows (editing only)")
    parser.add_argument("--out", action="append", default=None,
                        help="results JSON path (default bench/results/<device>-<mode>-<date>.json); with "
                             "--render it may be given twice (kernel rows from one file, editing from another)")
    parser.add_argument("--render", action="store_true", help="re-render bench/README.md and the plot from --out")
    parser.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _parse_shapes(names: list[str]) -> dict[str, tuple[int, int]]:
    shapes = {}
    for name in names:
        if name in SHAPES:
            shapes[name] = SHAPES[name]
        elif name in QUICK_SHAPES:
            shapes[name] = QUICK_SHAPES[name]
        elif "x" in name:
            n, m = (int(v) for v in name.split("x"))
            shapes[name] = (n, m)
        else:
            raise ValueError(f"unknown shape {name!r}; expected one of {list(SHAPES)} or NxM")
    return shapes


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults by device and mode, overridden by explicit flags."""
    cuda = args.device.startswith("cuda")
    config = Config(device=args.device)
    if cuda:
        config = Config(device=args.device, dtypes=("bf16", "fp32"), row_budget_s=0.05, max_call_s=2.0,
                        mem_cap_bytes=60 * 2**30, rotate_bytes=512 * 2**20, ceiling_copy_bytes=2 * 2**30,
                        ceiling_gemm_size=8192)
    if args.quick:
        config.shapes, config.ks, config.reps = dict(QUICK_SHAPES), QUICK_K_VALUES, 1
        config.row_budget_s, config.max_call_s, config.quick = 0.05, 2.0, True
        config.rotate_bytes, config.max_sets = 2 * 2**20, 2
        config.ceiling_copy_bytes, config.ceiling_gemm_size = 16 * 2**20, 256
    if args.dtypes:
        unknown = set(_split(args.dtypes)) - set(DTYPES)
        if unknown:
            raise ValueError(f"unknown dtypes {sorted(unknown)}; expected some of {list(DTYPES)}")
        config.dtypes = tuple(_split(args.dtypes))
    if args.shapes:
        config.shapes = _parse_shapes(_split(args.shapes))
    if args.ks:
        config.ks = tuple(int(k) for k in _split(args.ks))
    if args.ops:
        unknown = set(_split(args.ops)) - set(OPS)
        if unknown:
            raise ValueError(f"unknown ops {sorted(unknown)}; expected some of {list(OPS)}")
        config.ops = tuple(_split(args.ops))
    config.fwd_sides, config.bwd_sides = tuple(_split(args.fwd_sides)), tuple(_split(args.bwd_sides))
    for side in (*config.fwd_sides, *config.bwd_sides):
        if side not in ("left", "right"):
            raise ValueError(f"sides must be left or right, got {side!r}")
    config.providers = tuple(_split(args.providers)) if args.providers else None
    config.full = args.full or config.full
    config.threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if args.reps is not None:
        config.reps = args.reps
    if args.row_budget_s is not None:
        config.row_budget_s = args.row_budget_s
    if args.max_call_s is not None:
        config.max_call_s = args.max_call_s
    if args.mem_cap_gb is not None:
        config.mem_cap_bytes = args.mem_cap_gb * 2**30
    return config


def _default_out(config: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    kind = "quick" if config.quick else "full"
    return RESULTS_DIR / f"{config.device.split(':')[0]}-{kind}-{stamp}.json"


def run(args: argparse.Namespace) -> dict:
    """Run the configured benchmark and return the results document (also written to JSON)."""
    config = config_from_args(args)
    device = config.torch_device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA device; none is visible")
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(args, config, device)
    finally:
        torch.set_num_threads(threads)


def _best_ceilings(first: Ceilings, last: Ceilings, doc: dict) -> Ceilings:
    best = Ceilings(copy_bytes_per_s=max(first.copy_bytes_per_s, last.copy_bytes_per_s),
                    gemm_flops_per_s={k: max(v, last.gemm_flops_per_s.get(k, v))
                                      for k, v in first.gemm_flops_per_s.items()})
    doc["ceilings"].update(copy_bytes_per_s=best.copy_bytes_per_s, gemm_flops_per_s=best.gemm_flops_per_s,
                           measured_at_start={"copy": first.copy_bytes_per_s, "gemm": first.gemm_flops_per_s},
                           measured_at_end={"copy": last.copy_bytes_per_s, "gemm": last.gemm_flops_per_s},
                           rule="best of the measurements at the start and at the end of the run")
    return best


def _update_floor(row: dict, ceilings: Ceilings) -> None:
    case = Case(row["op"], row["shape"], row["n"], row["m"], row["k"],
                "left" if row["side"] == "-" else row["side"], DTYPES_BY_NAME[row["dtype"]])
    row["floor_s"] = floor_seconds(case, ceilings)
    if row["status"] == "ok":
        row["pct_floor"] = 100.0 * row["floor_s"] / row["median_s"]


def _run(args: argparse.Namespace, config: Config, device: torch.device) -> dict:
    started = time.perf_counter()
    if args.out and len(args.out) > 1:
        raise ValueError("--out may be given once, except with --render")
    out = Path(args.out[0]) if args.out else _default_out(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = measure.machine_info(device)
    ceilings = measure_ceilings(config)
    print(f"# {info['cpu'] if device.type == 'cpu' else info['gpu']['name']}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; copy {ceilings.copy_bytes_per_s / 1e9:.1f} GB/s (read+write), "
          f"GEMM " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in ceilings.gemm_flops_per_s.items()))
    config_doc = asdict(config)
    config_doc["dtypes"] = list(config.dtypes)
    doc = {
        "schema": SCHEMA,
        "machine": info,
        "config": config_doc,
        "ceilings": {"copy_bytes_per_s": ceilings.copy_bytes_per_s, "gemm_flops_per_s": ceilings.gemm_flops_per_s,
                     "copy_method": f"dst.copy_(src), {config.ceiling_copy_bytes / 2**20:.0f} MiB float32, "
                                    "bytes read + written, best of 5",
                     "gemm_method": f"torch.mm {config.ceiling_gemm_size}^3 random data, best of 3"},
        "memory_method": measure.CUDA_MEMORY_METHOD if device.type == "cuda" else measure.CPU_MEMORY_METHOD,
        "providers": {p.name: p.description for p in providers(device)},
        "rows": [],
        "complete": False,
    }

    def save() -> None:  # after every case, so a run stopped by a time limit keeps what it measured
        doc["wall_s"] = time.perf_counter() - started
        doc["machine"]["load_average_end"] = measure.load_average()
        out.write_text(json.dumps(doc, indent=1, default=str))

    if not args.no_kernels:
        run_kernels(config, ceilings, rows=doc["rows"], on_case=save)
        # Ceilings again at the end (load on a shared machine varies): the floor uses the best of both.
        ceilings = _best_ceilings(ceilings, measure_ceilings(config), doc)
        for row in doc["rows"]:
            _update_floor(row, ceilings)
    editing = args.editing == "on" or (args.editing == "auto" and not config.quick)
    if editing:
        from bench import editing_throughput

        doc["editing"] = editing_throughput.run(
            device=device, model=args.editing_model, edits=args.editing_edits, quick=config.quick, log=print)
    doc["complete"] = True
    save()
    print(f"# wrote {out} ({doc['wall_s']:.0f} s)")
    return dict(doc, path=str(out))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if (args.device == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ and not args.no_reexec
            and not args.render):
        # Map every block over 64 KiB so freed memory returns to the system and the RSS-based
        # peak-memory figure sees every allocation (see bench/measure.py).
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, "-m", "bench", *argv], env)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.render:
        from bench import report

        if not args.out:
            raise SystemExit("--render needs --out <results json>")
        report.render([Path(p) for p in args.out])
        return 0
    doc = run(args)
    return 0 if all(r["status"] != "error" for r in doc["rows"]) else 1
