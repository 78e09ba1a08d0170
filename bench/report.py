"""Render a results JSON into markdown tables (bench/README.md section and a full per-row table)
and one plot (time versus k per shape, floor drawn)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"

# Compact tables in the README: (op, side) pairs, in this order, when present in the results.
SUMMARY = (("fwd", "right"), ("fwd_inplace", "right"), ("bwd_V", "right"), ("bwd_VW", "right"), ("fwd", "left"))


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


def _mib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:,.1f}"


def _providers(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["provider"] for r in rows))


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["status"] == "ok":
        return _ms(row["median_s"])
    if row["status"] == "skipped":
        return f"*~{_ms(row['est_s'])}*"
    return "error"


def header(doc: dict) -> str:
    m, c = doc["machine"], doc["ceilings"]
    device = m.get("gpu", {}).get("name") if "gpu" in m else f"{m['cpu']}, {m['torch_threads']} torch threads"
    gemm = ", ".join(f"{k} {v / 1e9:,.1f} GFLOP/s" for k, v in c["gemm_flops_per_s"].items())
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return (f"Measured {m['date']} on {device} ({m['platform']}); {versions}; commit "
            f"`{(m.get('git_commit') or 'unknown')[:10]}`; load average {m.get('load_average_start')} at start, "
            f"{m.get('load_average_end')} at the end. Ceilings measured in the same run: copy "
            f"{c['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write), GEMM {gemm}. Peak extra memory: "
            f"{doc['memory_method']}. Total wall time {doc.get('wall_s', 0):.0f} s.")


def _reference_seconds(ref: dict | None) -> float | None:
    if ref is None or ref["status"] == "error":
        return None
    return ref["median_s"] if ref["status"] == "ok" else ref["est_s"]


def summary_table(doc: dict, op: str, side: str) -> str | None:
    """Shapes x k rows; median ms per provider; floor; our best against torch_wy and dense."""
    rows = [r for r in doc["rows"] if r["op"] == op and (r["side"] == side or op == "wy_factor")]
    if not rows:
        return None
    base = None
    if op == "fwd_inplace":  # the competitors are out of place: compare with their fwd rows
        base = {}
        for r in doc["rows"]:
            if r["op"] == "fwd" and r["side"] == side:
                base.setdefault((r["shape"], r["k"]), {})[r["provider"]] = r
    provs = _providers(rows)
    ours = [p for p in provs if p.startswith("mose:")]
    lines = [f"**{op}, side={side}** ({rows[0]['dtype']}; median ms; *~x* = estimated, not run; "
             "ratios from this run)", "",
             "| shape (n x m) | k | floor ms | " + " | ".join(provs) + " | best ours vs torch_wy | vs dense |",
             "|---" * (len(provs) + 5) + "|"]
    cases = list(dict.fromkeys((r["shape"], r["n"], r["m"], r["k"]) for r in rows))
    for shape, n, m, k in cases:
        cell = {r["provider"]: r for r in rows if (r["shape"], r["k"]) == (shape, k)}
        floor = next(iter(cell.values()))["floor_s"]
        best = min((cell[p] for p in ours if p in cell and cell[p]["status"] == "ok"),
                   key=lambda r: r["median_s"], default=None)
        ratio_wy = ratio_dense = "-"
        refs = base.get((shape, k), {}) if base is not None else cell
        if best is not None:
            for name, ref in (("torch_wy", refs.get("torch_wy")), ("dense", refs.get("dense"))):
                value = _reference_seconds(ref)
                if value is None:
                    continue
                text = f"{value / best['median_s']:.3g}x" + (" (est)" if ref["status"] == "skipped" else "")
                if name == "torch_wy":
                    ratio_wy = text
                else:
                    ratio_dense = text
        lines.append(f"| {shape} ({n} x {m}) | {k} | {_ms(floor)} | "
                     + " | ".join(_cell(cell.get(p)) for p in provs) + f" | {ratio_wy} | {ratio_dense} |")
    return "\n".join(lines)


def full_table(doc: dict) -> str:
    """Every row with every metric."""
    lines = ["| op | side | shape | k | dtype | provider | median ms | GB/s | GFLOP/s | % floor | peak extra MiB "
             "| x vs torch_wy | rel. err | note |", "|---" * 14 + "|"]
    for r in doc["rows"]:
        if r["status"] == "ok":
            vals = (_ms(r["median_s"]), f"{r['gb_per_s']:.2f}", f"{r['gflop_per_s']:.2f}", f"{r['pct_floor']:.1f}",
                    _mib(r.get("peak_extra_bytes")),
                    f"{r['speedup_vs_torch_wy']:.2f}" if "speedup_vs_torch_wy" in r else "-",
                    f"{r['rel_err']:.1e}" if "rel_err" in r else "-", f"{r['reps']} reps")
        else:
            vals = ("-",) * 7 + (f"{r['status']}: {r.get('reason', '')}".replace("|", "/"),)
        lines.append(f"| {r['op']} | {r['side']} | {r['shape']} | {r['k']} | {r['dtype']} | {r['provider']} | "
                     + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot(doc: dict, path: Path, op: str = "fwd", side: str = "right") -> Path | None:
    """Time versus k, one panel per shape, one line per provider, the floor dashed."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r["op"] == op and r["side"] == side]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if not shapes:
        return None
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 4.0), squeeze=False)
    provs = _providers(rows)
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(provs)}
    for ax, shape in zip(axes[0], shapes, strict=True):
        srows = [r for r in rows if r["shape"] == shape]
        ks = sorted({r["k"] for r in srows})
        floors = [next(r["floor_s"] for r in srows if r["k"] == k) * 1e3 for k in ks]
        ax.plot(ks, floors, "k--", lw=2, label="floor")
        for p in provs:
            pts = [(r["k"], r["median_s"] * 1e3) for r in srows if r["provider"] == p and r["status"] == "ok"]
            est = [(r["k"], r["est_s"] * 1e3) for r in srows if r["provider"] == p and r["status"] == "skipped"]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=colors[p], label=p)
            if est:
                ax.plot(*zip(*est, strict=True), "x", color=colors[p], alpha=0.5)
        n, m = srows[0]["n"], srows[0]["m"]
        ax.set_xscale("log", base=2)
        ax.set(yscale="log", xlabel="k (reflections)", title=f"{shape} ({n} x {m})")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("median time, ms (x: estimated, not run)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = min(len(labels), 5)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False)
    fig.suptitle(f"householder_apply {op}, side={side} ({rows[0]['dtype']}): time vs k, floor dashed")
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(labels) / ncol), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def editing_table(doc: dict) -> str | None:
    ed = doc.get("editing")
    if not ed:
        return None
    when = (f" (measured {ed['machine_date']}, {ed['threads']} torch threads, load average {ed['load']} at "
            f"start, `{ed['source']}`)" if "source" in ed else "")
    lines = [f"**Editing throughput**{when}: {ed['model']} ({ed['dtype']}), {ed['edits']} sequential edits from "
             f"{ed['requests']}; each method from the same unedited weights, on the same layers; "
             f"peak extra memory: {ed['memory_method']}; efficacy = {ed['efficacy']}.", "",
             "| method | layers | first edit s (incl. set-up) | s/edit after the first | s/edit (median, all) "
             "| peak extra MiB (all / after the first) | efficacy post-edit | efficacy after all |",
             "|---" * 8 + "|"]

    def f(x, digits=2):
        return "-" if x is None else f"{x:.{digits}f}"

    for r in ed["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | - | - | - | - | - | - | {r['status']}: {r.get('reason', '')} |")
            continue
        secs = r["seconds"]
        steady = sum(secs[1:]) / (len(secs) - 1) if len(secs) > 1 else None
        steady_peak = r.get("peak_extra_bytes_steady")
        lines.append(f"| {r['method']} | {r['layers']} | {secs[0]:.2f} | {f(steady)} | "
                     f"{r['seconds_per_edit_median']:.2f} | {_mib(r.get('peak_extra_bytes'))} / "
                     f"{_mib(steady_peak) if 'peak_extra_bytes_steady' in r else 'n/a'} | "
                     f"{f(r.get('efficacy_post_edit'))} | {f(r.get('efficacy_after_all'))} |")
    return "\n".join(lines)


def merge(paths: list[Path]) -> tuple[dict, list[Path]]:
    """Kernel rows from the first file that has any, editing from the first that has it."""
    docs = [(Path(p), json.loads(Path(p).read_text())) for p in paths]
    main = next(((p, d) for p, d in docs if d["rows"]), docs[0])
    doc = dict(main[1])
    editing = next(((p, d) for p, d in docs if d.get("editing")), None)
    if editing is not None:
        doc["editing"] = dict(editing[1]["editing"], source=editing[0].name,
                              machine_date=editing[1]["machine"]["date"],
                              threads=editing[1]["machine"]["torch_threads"],
                              load=editing[1]["machine"].get("load_average_start"))
    return doc, [main[0]] + ([editing[0]] if editing is not None and editing[0] != main[0] else [])


def render(results: Path | list[Path], readme: Path = README) -> None:
    """Write ``<results>.md`` (every row), ``<results>.png`` (the plot) and the README section.

    Several files may be given: kernel rows come from the first that has any, the editing section
    from the first that has one."""
    doc, used = merge(results if isinstance(results, list) else [results])
    results = used[0]
    full_path = results.with_suffix(".md")
    full_path.write_text(f"# Every row of {results.name}\n\n{header(doc)}\n\n{full_table(doc)}\n")
    png = plot(doc, results.with_suffix(".png"))
    files = ", ".join(f"[`{p.name}`](results/{p.name})" for p in used)
    parts = [f"Results files: {files}; every row with every metric: [`{full_path.name}`](results/{full_path.name}).",
             "", header(doc), ""]
    if png is not None:
        parts += [f"![time vs k](results/{png.name})", ""]
    for op, side in SUMMARY:
        table = summary_table(doc, op, side)
        if table:
            parts += [table, ""]
    table = editing_table(doc)
    if table:
        parts += [table, ""]
    section = "\n".join(parts)
    text = readme.read_text() if readme.exists() else f"{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{section}\n{END}", text,
                  flags=re.DOTALL)
    readme.write_text(text)
