"""Sequential-editing protocols and the study that runs MOSE beside the additive baselines.

One sequential pass edits the requests one after another, never resetting the model. Two
protocols read it (every report says which numbers come from which):

- ``"after-each"``: request ``i`` is scored right after edit ``i`` (what EasyEdit reported before
  2026: did the edit take, at the moment it was made);
- ``"after-all"``: every request is scored after the last edit (retention: do earlier edits
  survive the later ones). With it, the same scores are taken for the first ``n`` requests at a
  few checkpoints ``n`` (the curves of the report), together with the stability of each edited
  weight and the model's health (perplexity, agreement on unedited facts).

Locality always compares against the *base* model's predictions, computed once before editing.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mose_kernels.editing.adapters import find_edit_targets
from mose_kernels.editing.config import EditConfig, preset_for
from mose_kernels.editing.editor import MoseEditor
from mose_kernels.editing.requests import EditRequest
from mose_kernels.evaluation import metrics
from mose_kernels.evaluation.baselines import FineTuneEditor, NullSpaceEditor, RankOneEditor, maths_weight

logger = logging.getLogger(__name__)

PROTOCOLS = ("after-each", "after-all")
METHODS = ("mose", "ft", "rome", "alphaedit")


@dataclass
class Reference:
    """What the base model does, computed once before any edit.

    Attributes:
        locality: per request, the base argmax tokens on its neighbourhood prompts.
        probes: unedited facts ``(prompt, answer)``; ``probe_tokens`` the base argmax tokens on them.
        text: the perplexity text; ``perplexity`` the base model's.
        fluency_prompts: prompts of the greedy generations; ``generations`` the base texts and
            ``ngram_entropy`` their mean entropy.
        weights: per edited module name, a float64 copy of the base ``(out, in)`` weight and its
            singular values.
    """

    locality: list[list[Tensor]]
    probes: list[tuple[str, str]]
    probe_tokens: list[Tensor]
    probe_accuracy: float
    text: str
    perplexity: float
    fluency_prompts: list[str]
    generations: list[str]
    ngram_entropy: float
    weights: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


def build_reference(model: nn.Module, tokenizer, requests: Sequence[EditRequest], *, layers: Sequence[int],
                    probes: Sequence[tuple[str, str]], text: str, fluency_prompts: Sequence[str],
                    max_new_tokens: int = 30) -> Reference:
    """Score the base model once (see :class:`Reference`)."""
    probes = list(probes)
    probe_scores = metrics.teacher_forced(model, tokenizer, probes)
    entropy, texts = metrics.fluency(model, tokenizer, fluency_prompts, max_new_tokens)
    weights = {}
    for t in find_edit_targets(model, list(layers)):
        w = maths_weight(t).detach().double().cpu().clone()
        weights[t.name] = (w, torch.linalg.svdvals(w))
    return Reference(
        locality=metrics.locality_reference(model, tokenizer, requests),
        probes=probes,
        probe_tokens=[s.predicted for s in probe_scores],
        probe_accuracy=sum(s.accuracy for s in probe_scores) / max(len(probes), 1),
        text=text,
        perplexity=metrics.perplexity(model, tokenizer, text),
        fluency_prompts=list(fluency_prompts),
        generations=texts,
        ngram_entropy=entropy,
        weights=weights,
    )


def checkpoints(total: int, count: int = 8) -> list[int]:
    """``count + 1`` roughly evenly spaced edit counts from 0 to ``total`` (both included)."""
    if total < 0 or count < 1:
        raise ValueError(f"total must be >= 0 and count >= 1, got {total}, {count}")
    return sorted({round(i * total / count) for i in range(count + 1)})


def stability(model: nn.Module, reference: Reference) -> dict[str, dict[str, float]]:
    """:func:`metrics.weight_stability` of each module of ``reference.weights`` in ``model``."""
    names = list(reference.weights)
    by_name = {t.name: t for t in find_edit_targets(model, sorted({_layer_of(n) for n in names}))}
    out = {}
    for name in names:
        base, svals = reference.weights[name]
        out[name] = metrics.weight_stability(maths_weight(by_name[name]), base, svals)
    return out


def _layer_of(name: str) -> int:
    digits = [p for p in name.split(".") if p.isdigit()]
    if not digits:
        raise ValueError(f"cannot read a layer index from module name {name!r}")
    return int(digits[0])


def _health(model: nn.Module, tokenizer, reference: Reference) -> dict[str, float]:
    return {
        "perplexity": metrics.perplexity(model, tokenizer, reference.text),
        "probe_agreement": metrics.probe_agreement(model, tokenizer, reference.probes, reference.probe_tokens),
    }


def run_sequential(editor, model: nn.Module, tokenizer, requests: Sequence[EditRequest], reference: Reference,
                   *, protocols: Sequence[str] = PROTOCOLS, curve_points: int = 8, max_new_tokens: int = 30,
                   progress: bool = True, label: str = "") -> dict[str, Any]:
    """Edit ``requests`` one after another with ``editor`` and score them under ``protocols``.

    Args:
        editor: anything with ``edit([request]) -> [EditResult]`` that edits ``model`` in place
            (:class:`MoseEditor` or a baseline).
        reference: :func:`build_reference` of the base model for the same requests.
        curve_points: number of checkpoints of the after-all curves (besides 0 edits).

    Returns:
        A JSON-ready dict: ``edits`` (per-edit solver outcome and seconds), ``after_each`` and/or
        ``after_all`` (``summary`` and ``per_request`` scores), ``curve`` (per checkpoint: scores
        of the requests edited so far, stability, health) and ``final`` (stability, health,
        fluency and generations after the last edit).
    """
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or not protocols:
        raise ValueError(f"protocols must be a non-empty subset of {PROTOCOLS}, got {list(protocols)}")
    if len(reference.locality) != len(requests):
        raise ValueError(f"reference covers {len(reference.locality)} requests, got {len(requests)}")
    points = set(checkpoints(len(requests), curve_points)) if "after-all" in protocols else set()
    edits, after_each, curve = [], [], []
    last_scores: list = []  # the per-request scores of the last checkpoint (reused by after-all)

    def checkpoint(n: int) -> None:
        scores = metrics.score_requests(model, tokenizer, requests[:n], reference.locality[:n]) if n else []
        last_scores[:] = scores
        curve.append({"edits": n, "scores": metrics.summarize(scores), "stability": stability(model, reference),
                      **_health(model, tokenizer, reference)})

    if 0 in points:
        checkpoint(0)
    bar = tqdm(requests, desc=f"editing ({label})" if label else "editing", unit="edit", disable=not progress)
    started = time.perf_counter()
    for i, request in enumerate(bar):
        result = editor.edit([request])[0]
        record = {"case_id": request.case_id, "success": bool(result.success), "steps": int(result.steps),
                  "final_loss": float(result.final_loss), "seconds": float(result.seconds)}
        extra = getattr(result, "extra", None) or {}
        for key in ("keep_dims", "keep_released"):  # the largest over the edited layers
            if extra.get(key):
                record[key] = int(max(extra[key].values()))
        edits.append(record)
        if "after-each" in protocols:
            after_each.extend(metrics.score_requests(model, tokenizer, [request], reference.locality[i : i + 1]))
        if i + 1 in points:
            checkpoint(i + 1)
        bar.set_postfix(loss=f"{result.final_loss:.3f}", ok=sum(e["success"] for e in edits))
    total_seconds = time.perf_counter() - started
    entropy, texts = metrics.fluency(model, tokenizer, reference.fluency_prompts, max_new_tokens)
    out: dict[str, Any] = {
        "edits": edits,
        "seconds_per_edit": sum(e["seconds"] for e in edits) / max(len(edits), 1),
        "total_seconds": total_seconds,
        "final": {"stability": stability(model, reference), **_health(model, tokenizer, reference),
                  "ngram_entropy": entropy, "generations": texts},
    }
    if "after-each" in protocols:
        out["after_each"] = {"summary": metrics.summarize(after_each), "per_request": after_each}
    if "after-all" in protocols:
        # the checkpoint after the last edit scored the same model on the same requests
        final_scores = (list(last_scores) if curve and curve[-1]["edits"] == len(requests) and requests
                        else metrics.score_requests(model, tokenizer, requests, reference.locality))
        out["after_all"] = {"summary": metrics.summarize(final_scores), "per_request": final_scores}
        out["curve"] = curve
    return out


def make_editor(method: str, model: nn.Module, tokenizer, config: EditConfig, *,
                baseline_options: dict[str, Any] | None = None):
    """Build the editor of ``method`` (see :data:`METHODS`) on ``config.layers``.

    ``"mose"`` uses ``config`` itself; ``"ft"`` fine-tunes the same layers (with its own settings,
    :class:`FineTuneEditor`'s defaults unless ``baseline_options["ft"]`` overrides them); ``"rome"``
    and ``"alphaedit"`` edit the middle layer of ``config.layers``.
    """
    options = dict(baseline_options or {})
    layers = list(config.layers)
    if method == "mose":
        return MoseEditor(model, tokenizer, copy.deepcopy(config))
    if method == "ft":
        return FineTuneEditor(model, tokenizer, layers, template=config.template, **options.get("ft", {}))
    middle = layers[len(layers) // 2]
    if method == "rome":
        return RankOneEditor(model, tokenizer, middle, template=config.template, **options.get("rome", {}))
    if method == "alphaedit":
        return NullSpaceEditor(model, tokenizer, middle, template=config.template, **options.get("alphaedit", {}))
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def run_study(model: nn.Module, tokenizer, requests: Sequence[EditRequest], *, methods: Sequence[str],
              config: EditConfig | None = None, protocols: Sequence[str] = PROTOCOLS,
              probes: Sequence[tuple[str, str]], text: str, fluency_prompts: Sequence[str],
              curve_points: int = 8, max_new_tokens: int = 30, progress: bool = True,
              baseline_options: dict[str, Any] | None = None,
              on_method_done: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every method of ``methods`` on its own copy of ``model`` (the base is never edited).

    Returns:
        ``{"config": ..., "protocols": [...], "reference": {...}, "methods": {name: run}}`` where
        each run is :func:`run_sequential`'s dict plus the method's settings.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be a non-empty list from {METHODS}, got {list(methods)}")
    config = copy.deepcopy(config) if config is not None else preset_for(model)
    requests = list(requests)
    reference = build_reference(model, tokenizer, requests, layers=config.layers, probes=probes, text=text,
                                fluency_prompts=fluency_prompts, max_new_tokens=max_new_tokens)
    study: dict[str, Any] = {
        "config": config.to_dict(),
        "protocols": list(protocols),
        "num_requests": len(requests),
        "reference": {"perplexity": reference.perplexity, "probe_accuracy": reference.probe_accuracy,
                      "ngram_entropy": reference.ngram_entropy, "fluency_prompts": reference.fluency_prompts,
                      "generations": reference.generations,
                      "stability": stability(model, reference)},
        "methods": {},
    }
    for method in methods:
        work = copy.deepcopy(model)
        editor = make_editor(method, work, tokenizer, config, baseline_options=baseline_options)
        run = run_sequential(editor, work, tokenizer, requests, reference, protocols=protocols,
                             curve_points=curve_points, max_new_tokens=max_new_tokens, progress=progress,
                             label=method)
        run["layers"] = [t.name for t in editor.targets]
        study["methods"][method] = run
        if on_method_done is not None:
            on_method_done(method, study)
        del editor, work
    return study
