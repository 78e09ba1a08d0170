"""Timers, peak-memory probes and machine ceilings, for CPU and CUDA.

Timing: on CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, median); on
the CPU, ``time.perf_counter`` around single calls, median of the repetitions. Callers rotate among
several input sets so small shapes are not timed out of cache.

Peak extra memory:
- CUDA: ``torch.cuda.max_memory_allocated()`` during one call minus the memory allocated before it.
- CPU: the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) during one
  call minus the resident set before it. ``tracemalloc`` does not see torch's allocations. This counts
  the pages the call touches; allocations served from memory the C allocator already holds are
  missed, so ``python -m bench`` sets ``MALLOC_MMAP_THRESHOLD_`` (every block over 64 KiB mapped and
  returned to the system on free) to make the figure faithful. Where ``clear_refs`` is not writable
  the figure is absent (``None``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CPU_MEMORY_METHOD = "peak RSS increase during one call (VmHWM reset via /proc/self/clear_refs)"
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated increase during one call"


def _proc_status_bytes(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes of memory ``fn`` needs beyond what exists before the call (see module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        del result
        return torch.cuda.max_memory_allocated(device) - before
    before = _proc_status_bytes("VmRSS")
    if before is None or not _reset_peak_rss():
        fn()
        return None
    result = fn()
    peak = _proc_status_bytes("VmHWM")
    del result
    return None if peak is None else max(0, peak - before)


def time_calls(fn: Callable[[], object], device: torch.device, *, reps: int, budget_s: float) -> list[float]:
    """Seconds per call of ``fn`` (already warmed up).

    CUDA: one median from ``do_bench`` over ``budget_s`` (at most), returned as a one-element list.
    CPU: up to ``reps`` single calls, stopping early once ``budget_s`` is spent (at least one).
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        ms = do_bench(fn, warmup=min(25, budget_s * 250), rep=max(10, budget_s * 1000), return_mode="median")
        return [ms / 1e3]
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return times


def median(times: list[float]) -> float:
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes read plus written per second by ``dst.copy_(src)`` on ``nbytes`` float32 buffers."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = min(time_calls(lambda: dst.copy_(src), device, reps=5, budget_s=1.0))
    return 2.0 * nbytes / t


def measure_gemm_rate(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """FLOP/s of one ``size^3`` matrix product on random data."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)
    _sync(device)
    t = min(time_calls(lambda: torch.mm(a, b), device, reps=3, budget_s=2.0))
    return 2.0 * size**3 / t


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other processes distort CPU timings: recorded with them)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict:
    """Machine, versions and date for the results file."""
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
        "device": str(device),
        "versions": {"torch": torch.__version__},
        "git_commit": _git_commit(),
    }
    try:
        import triton

        info["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    import mose_kernels

    info["versions"]["mose_kernels"] = mose_kernels.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_bytes": props.total_memory,
                       "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda,
                       "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    return info


def emit_json_line(record: dict, out: str | Path | None = None) -> None:
    """Print ``record`` as one JSON line and, if ``out`` is given, append the line to that file."""
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
