"""Report folder of a study: ``report.md``, ``metrics.json`` and PNG plots (matplotlib, Agg backend).

Plots, one line per method (MOSE beside the additive baselines), against the number of edits
(after-all protocol at the study's checkpoints):
  - ``quality_vs_edits.png``: token-level efficacy, generalisation and locality;
  - ``counterfact_vs_edits.png``: MEMIT probability comparisons (efficacy, paraphrase, neighbourhood);
  - ``stability_vs_edits.png``: relative Frobenius norm and condition number of the edited weight;
  - ``health_vs_edits.png``: perplexity of the shipped text and agreement on unedited facts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mose_kernels._files import atomic_write, atomic_write_text

PROTOCOL_TEXT = {
    "after_each": "after-each: request i is scored right after edit i (did the edit take when it was made)",
    "after_all": "after-all: every request is scored after the last edit (do earlier edits survive)",
}
TABLE_COLUMNS = (
    ("rewrite_acc", "efficacy (tok)"),
    ("rephrase_acc", "generalisation (tok)"),
    ("locality_acc", "locality (tok)"),
    ("efficacy_success", "ES p(new)>p(true)"),
    ("paraphrase_success", "PS"),
    ("neighborhood_success", "NS"),
    ("efficacy_magnitude", "EM"),
    ("paraphrase_magnitude", "PM"),
    ("neighborhood_magnitude", "NM"),
)
LABELS = {"mose": "MOSE (multiplicative)", "ft": "FT-M (additive)", "rome": "ROME-style (additive)",
          "alphaedit": "AlphaEdit-style (additive)"}
PLOTS = ("quality_vs_edits.png", "counterfact_vs_edits.png", "stability_vs_edits.png", "health_vs_edits.png")


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``None`` (strict JSON has no NaN/Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "inf"
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.{digits}f}"
    return str(value)


def _label(method: str) -> str:
    return LABELS.get(method, method)


def _focus_layer(study: dict[str, Any]) -> str | None:
    """The module every method edits (the middle of the configured layers), for the stability plots."""
    names = list(study["reference"]["stability"])
    return names[len(names) // 2] if names else None


def _plot_curves(study: dict[str, Any], path: Path, panels: list[tuple[str, str, Any]], title: str,
                 logy: tuple[bool, ...] = ()) -> None:
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for j, (ylabel, _key, getter) in enumerate(panels):
        ax = axes[0, j]
        for method, run in study["methods"].items():
            points = [(p["edits"], getter(p)) for p in run.get("curve", [])]
            points = [(x, y) for x, y in points if y is not None and math.isfinite(y)]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=_label(method))
        ax.set_xlabel("number of sequential edits")
        ax.set_ylabel(ylabel)
        if j < len(logy) and logy[j]:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_plots(study: dict[str, Any], out: Path) -> list[Path]:
    """Write the four PNG plots of :data:`PLOTS` into ``out``; returns their paths."""
    layer = _focus_layer(study)
    base = study["reference"]["stability"].get(layer, {}) if layer else {}

    def score(key: str):
        return lambda p: p["scores"].get(key)

    def stab(key: str, relative: bool = False):
        def get(p):
            value = p["stability"].get(layer, {}).get(key) if layer else None
            if value is None:
                return None
            return value / base[key] if relative and base.get(key) else value
        return get

    paths = [out / name for name in PLOTS]
    _plot_curves(study, paths[0], [("efficacy (token acc.)", "", score("rewrite_acc")),
                                   ("generalisation (token acc.)", "", score("rephrase_acc")),
                                   ("locality (token agreement)", "", score("locality_acc"))],
                 "Edits made so far, scored after the n-th edit (after-all protocol)")
    _plot_curves(study, paths[1], [("efficacy success p(new)>p(true)", "", score("efficacy_success")),
                                   ("paraphrase success", "", score("paraphrase_success")),
                                   ("neighbourhood success p(true)>p(new)", "", score("neighborhood_success"))],
                 "CounterFact probability comparisons (after-all protocol)")
    _plot_curves(study, paths[2], [("||W||_F / ||W0||_F", "", stab("fro_norm", relative=True)),
                                   ("condition number of W", "", stab("cond")),
                                   ("max singular-value drift / s0_max", "", stab("max_sv_rel_change"))],
                 f"Stability of {layer}", logy=(False, True, False))
    _plot_curves(study, paths[3], [("perplexity of the shipped text", "", lambda p: p.get("perplexity")),
                                   ("agreement with base on unedited facts", "", lambda p: p.get("probe_agreement"))],
                 "General health of the edited model")
    return paths


def _scores_table(study: dict[str, Any], key: str) -> list[str]:
    lines = ["| method | " + " | ".join(c[1] for c in TABLE_COLUMNS) + " |",
             "|---|" + "---|" * len(TABLE_COLUMNS)]
    for method, run in study["methods"].items():
        summary = run.get(key, {}).get("summary", {})
        lines.append(f"| {_label(method)} | " + " | ".join(_fmt(summary.get(c[0])) for c in TABLE_COLUMNS) + " |")
    return lines


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """The MOSE settings a reader needs: the main ones, plus every other that is not the default
    (lists of texts shown by their length)."""
    from mose_kernels.editing.config import EditConfig, keep_corpus_label

    keys = ("layers", "solver", "side", "num_reflections", "steps", "lr", "keep_corpus_dirs")
    out = {k: config[k] for k in keys if k in config}
    if "keep_corpus" in config and config.get("keep_corpus_dirs"):
        out["keep_corpus"] = keep_corpus_label(config["keep_corpus"])
    defaults = EditConfig().to_dict()
    for k, v in config.items():
        if k in out or k not in defaults or v == defaults[k]:
            continue
        out[k] = f"{len(v)} texts" if isinstance(v, list) and v and isinstance(v[0], str) else v
    return out


def render_markdown(study: dict[str, Any], *, title: str, header: dict[str, str]) -> str:
    """The text of ``report.md``."""
    ref = study["reference"]
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    if "mose" in study["methods"]:
        settings = f"- **MOSE settings**: `{json.dumps(_settings(study['config']))}`"
    else:  # the baselines read only the layers from the config
        settings = (f"- **layers**: {list(study['config'].get('layers', []))} (FT-M edits all of them, "
                    "ROME-style and AlphaEdit-style the middle one)")
    lines += [f"- **edited requests**: {study['num_requests']}, edited one after another (sequential editing)",
              f"- **protocols**: {', '.join(study['protocols'])}",
              settings,
              "", "Metric definitions: `mose_kernels/evaluation/METRICS.md` (token-level = EasyEdit, "
              "ES/PS/NS and magnitudes = MEMIT CounterFact). Locality always compares with the base model.", ""]
    for key in ("after_each", "after_all"):
        if any(key in run for run in study["methods"].values()):
            lines += [f"## Protocol {PROTOCOL_TEXT[key].split(':')[0]}", "", PROTOCOL_TEXT[key] + ".", ""]
            lines += [*_scores_table(study, key), ""]
    if any("curve" in run for run in study["methods"].values()):
        lines += ["## Against the number of edits (after-all protocol at checkpoints)", ""]
        lines += [f"![{name}]({name})" for name in PLOTS] + [""]
        lines += ["| method | edits | efficacy | generalisation | locality | ||W||_F | cond | perplexity |",
                  "|---|---|---|---|---|---|---|---|"]
        layer = _focus_layer(study)
        for method, run in study["methods"].items():
            for p in run.get("curve", []):
                s = p["stability"].get(layer, {})
                lines.append(f"| {_label(method)} | {p['edits']} | {_fmt(p['scores'].get('rewrite_acc'))} | "
                             f"{_fmt(p['scores'].get('rephrase_acc'))} | {_fmt(p['scores'].get('locality_acc'))} | "
                             f"{_fmt(s.get('fro_norm'))} | {_fmt(s.get('cond'))} | {_fmt(p.get('perplexity'))} |")
        lines.append("")
    lines += ["## Stability of each edited weight after the last edit", "",
              "| method | module | ||W||_F (base) | ||W||_F | cond (base) | cond | max sv drift | ||W-W0||/||W0|| |",
              "|---|---|---|---|---|---|---|---|"]
    for method, run in study["methods"].items():
        for name, s in run["final"]["stability"].items():
            b = ref["stability"].get(name, {})
            lines.append(f"| {_label(method)} | `{name}` | {_fmt(b.get('fro_norm'))} | {_fmt(s['fro_norm'])} | "
                         f"{_fmt(b.get('cond'))} | {_fmt(s['cond'])} | {_fmt(s['max_sv_rel_change'])} | "
                         f"{_fmt(s['rel_change'])} |")
    lines += ["", "## General health after the last edit", "",
              "| model | perplexity | agreement on unedited facts | n-gram entropy | s / edit | solver success |",
              "|---|---|---|---|---|---|",
              f"| base | {_fmt(ref['perplexity'])} | 1.000 (accuracy {_fmt(ref['probe_accuracy'])}) | "
              f"{_fmt(ref['ngram_entropy'])} | - | - |"]
    for method, run in study["methods"].items():
        f = run["final"]
        ok = sum(e["success"] for e in run["edits"]) / max(len(run["edits"]), 1)
        lines.append(f"| {_label(method)} | {_fmt(f['perplexity'])} | {_fmt(f['probe_agreement'])} | "
                     f"{_fmt(f['ngram_entropy'])} | {_fmt(run['seconds_per_edit'], 2)} | {_fmt(ok)} |")
    lines += ["", "## Greedy generations before and after editing", ""]
    for i, prompt in enumerate(ref["fluency_prompts"]):
        lines += [f"**{prompt}**", "", f"- base: {ref['generations'][i]!r}"]
        for method, run in study["methods"].items():
            lines.append(f"- {_label(method)}: {run['final']['generations'][i]!r}")
        lines.append("")
    return "\n".join(lines)


def write_report(study: dict[str, Any], out: str | Path, *, title: str = "MOSE sequential editing report",
                 header: dict[str, str] | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``metrics.json`` and the plots into ``out`` (created if needed), each atomically.

    Returns:
        ``{"report": ..., "metrics": ..., "plots": [...]}`` paths.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = dict(header or {})
    metrics_path = out / "metrics.json"
    atomic_write_text(metrics_path, json.dumps(_clean({"header": header, **study}), indent=1, allow_nan=False))
    plots = write_plots(study, out) if any("curve" in r for r in study["methods"].values()) else []
    report_path = out / "report.md"
    atomic_write_text(report_path, render_markdown(study, title=title, header=header))
    return {"report": report_path, "metrics": metrics_path, "plots": plots}


def merge_studies(studies: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> dict[str, Any]:
    """One study from several runs of the same study with different methods (e.g. one process per
    method, run side by side): the ``methods`` are combined, everything else must agree.

    Args:
        studies: ``metrics.json`` contents written by :func:`write_report`.
        names: a label per study for error messages (default ``study 0``, ``study 1``, ...).

    Raises:
        ValueError: if the studies differ in the requests, the protocols, the edited layers, the
            MOSE settings (between studies that ran MOSE) or the base model's reference numbers, or
            if a method appears twice.
    """
    names = list(names) if names is not None else [f"study {i}" for i in range(len(studies))]
    if len(studies) < 2:
        raise ValueError(f"merging needs at least two studies, got {len(studies)}")
    if len(names) != len(studies):
        raise ValueError(f"got {len(names)} names for {len(studies)} studies")
    # The MOSE settings matter where MOSE ran; the baselines read only the edited layers (and the
    # module template) from them.
    ref = next((i for i, s in enumerate(studies) if "mose" in s.get("methods", {})), 0)
    first = studies[ref]
    must_agree = {
        "num_requests": lambda s: s.get("num_requests"),
        "protocols": lambda s: s.get("protocols"),
        "edited layers": lambda s: {k: (s.get("config") or {}).get(k) for k in ("layers", "template")},
        "request file": lambda s: s.get("header", {}).get("requests"),
        "model": lambda s: s.get("header", {}).get("model"),
        "base model perplexity": lambda s: s.get("reference", {}).get("perplexity"),
        "base weights": lambda s: s.get("reference", {}).get("stability"),
    }
    for name, study in zip(names, studies, strict=True):
        if "mose" in study.get("methods", {}) and study.get("config") != first.get("config"):
            raise ValueError(f"cannot merge {name} with {names[ref]}: MOSE settings differ "
                             f"({study.get('config')!r} vs {first.get('config')!r})")
        for what, get in must_agree.items():
            if get(study) != get(first):
                raise ValueError(f"cannot merge {name} with {names[ref]}: {what} differ "
                                 f"({get(study)!r} vs {get(first)!r})")
    merged = {k: v for k, v in first.items() if k not in ("header", "methods")}
    merged["methods"] = {}
    for name, study in zip(names, studies, strict=True):
        for method, run in study["methods"].items():
            if method in merged["methods"]:
                raise ValueError(f"cannot merge: method {method!r} appears twice (again in {name})")
            merged["methods"][method] = run
    return merged
