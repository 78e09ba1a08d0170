"""Protocols and report on a tiny model: what is scored when, and what the report folder holds."""

from __future__ import annotations

import json

import pytest

from mose_kernels.editing.config import EditConfig
from mose_kernels.editing.editor import EditResult
from mose_kernels.editing.requests import load_requests
from mose_kernels.evaluation import protocols
from mose_kernels.evaluation.report import PLOTS, render_markdown, write_report
from tests.evaluation.tiny import DEMO_REQUESTS, PERPLEXITY_TEXT

PROBES = [("Bees make", "honey"), ("The first month of the year is", "January")]


class NoOpEditor:
    """Edits nothing: every score must equal the base model's."""

    def __init__(self) -> None:
        self.calls = 0

    def edit(self, requests):
        self.calls += 1
        return [EditResult(self.calls - 1, r, False, 0, 1.0, 0.0, []) for r in requests]


def _reference(model, tokenizer, requests, layers=(1, 2)):
    return protocols.build_reference(model, tokenizer, requests, layers=layers, probes=PROBES,
                                     text=PERPLEXITY_TEXT.read_text()[:400], fluency_prompts=["Bees make"],
                                     max_new_tokens=4)


def test_checkpoints():
    assert protocols.checkpoints(8, 4) == [0, 2, 4, 6, 8]
    assert protocols.checkpoints(3, 8) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        protocols.checkpoints(5, 0)


@pytest.mark.parametrize("chosen", [("after-each",), ("after-all",), ("after-each", "after-all")])
def test_no_op_editor_keeps_base_scores(tiny_model, tiny_tokenizer, chosen):
    requests = load_requests(DEMO_REQUESTS, limit=3)
    ref = _reference(tiny_model, tiny_tokenizer, requests)
    editor = NoOpEditor()
    run = protocols.run_sequential(editor, tiny_model, tiny_tokenizer, requests, ref, protocols=chosen,
                                   curve_points=3, max_new_tokens=4, progress=False)
    assert editor.calls == 3 and len(run["edits"]) == 3
    assert ("after_each" in run) == ("after-each" in chosen)
    assert ("after_all" in run) == ("after-all" in chosen)
    for key in ("after_each", "after_all"):
        if key in run:
            assert run[key]["summary"]["locality_acc"] == 1.0
            assert len(run[key]["per_request"]) == 3
    if "after-all" in chosen:
        assert [p["edits"] for p in run["curve"]] == [0, 1, 2, 3]
        assert all(p["probe_agreement"] == 1.0 for p in run["curve"])
        assert run["curve"][-1]["perplexity"] == pytest.approx(ref.perplexity)
    final = run["final"]
    assert final["generations"] == ref.generations
    assert all(s["rel_change"] == 0.0 for s in final["stability"].values())


def test_edit_records_carry_the_keep_subspace_state(tiny_model, tiny_tokenizer):
    """Each edit's record holds its keep subspace's size and released directions (the largest
    over the layers), so a study shows when compression began."""
    class KeepReportingEditor(NoOpEditor):
        def edit(self, requests):
            self.calls += 1
            extra = {"keep_dims": {"a": 3 * self.calls, "b": 5 * self.calls},
                     "keep_released": {"a": 0, "b": self.calls - 1}}
            return [EditResult(self.calls - 1, r, True, 1, 0.1, 0.0, [], extra) for r in requests]

    requests = load_requests(DEMO_REQUESTS, limit=2)
    ref = _reference(tiny_model, tiny_tokenizer, requests)
    run = protocols.run_sequential(KeepReportingEditor(), tiny_model, tiny_tokenizer, requests, ref,
                                   protocols=["after-each"], max_new_tokens=4, progress=False)
    assert [(e["keep_dims"], e["keep_released"]) for e in run["edits"]] == [(5, 0), (10, 1)]
    plain = protocols.run_sequential(NoOpEditor(), tiny_model, tiny_tokenizer, requests, ref,
                                     protocols=["after-each"], max_new_tokens=4, progress=False)
    assert all("keep_dims" not in e for e in plain["edits"])


def test_after_all_reuses_the_last_checkpoint(tiny_model, tiny_tokenizer, monkeypatch):
    """The checkpoint after the last edit already scored every request on the final model: the
    after-all scores are those (one scoring pass fewer), and they match the curve's last point."""
    requests = load_requests(DEMO_REQUESTS, limit=3)
    ref = _reference(tiny_model, tiny_tokenizer, requests)
    scored, score = [], protocols.metrics.score_requests

    def spy(model, tokenizer, reqs, locality):
        scored.append(len(reqs))
        return score(model, tokenizer, reqs, locality)

    monkeypatch.setattr(protocols.metrics, "score_requests", spy)
    run = protocols.run_sequential(NoOpEditor(), tiny_model, tiny_tokenizer, requests, ref, protocols=["after-all"],
                                   curve_points=3, max_new_tokens=4, progress=False)
    assert scored == [1, 2, 3]
    assert run["after_all"]["summary"] == run["curve"][-1]["scores"]
    assert len(run["after_all"]["per_request"]) == 3
    scored.clear()  # a curve that does not end at the last edit (no after-all checkpoints) scores once
    protocols.run_sequential(NoOpEditor(), tiny_model, tiny_tokenizer, requests, ref, protocols=["after-each"],
                             curve_points=3, max_new_tokens=4, progress=False)
    assert scored == [1, 1, 1]


def test_run_sequential_rejects_bad_protocols(tiny_model, tiny_tokenizer):
    requests = load_requests(DEMO_REQUESTS, limit=1)
    ref = _reference(tiny_model, tiny_tokenizer, requests)
    with pytest.raises(ValueError, match="protocols"):
        protocols.run_sequential(NoOpEditor(), tiny_model, tiny_tokenizer, requests, ref, protocols=["later"])


def test_study_and_report(tiny_model, tiny_tokenizer, tmp_path):
    requests = load_requests(DEMO_REQUESTS, limit=2)
    config = EditConfig(layers=[1, 2], steps=3, keep_corpus_dirs=4, keep_corpus=["Bees make honey."] * 4)
    study = protocols.run_study(
        tiny_model, tiny_tokenizer, requests, methods=["mose", "ft", "rome", "alphaedit"], config=config,
        probes=PROBES, text=PERPLEXITY_TEXT.read_text()[:400], fluency_prompts=["Bees make"], curve_points=2,
        max_new_tokens=4, progress=False,
        baseline_options={"ft": {"steps": 2}, "rome": {"value_steps": 2, "corpus": ["Bees make honey."] * 4},
                          "alphaedit": {"value_steps": 2, "corpus": ["Bees make honey."] * 4}},
    )
    assert list(study["methods"]) == ["mose", "ft", "rome", "alphaedit"]
    mose = study["methods"]["mose"]["final"]["stability"]
    assert all(s["max_sv_rel_change"] < 1e-4 for s in mose.values())
    assert study["methods"]["rome"]["layers"] == ["model.layers.2.mlp.down_proj"]
    paths = write_report(study, tmp_path, header={"command": "test"})
    data = json.loads(paths["metrics"].read_text())
    assert data["header"]["command"] == "test" and data["num_requests"] == 2
    text = paths["report"].read_text()
    assert "Protocol after-each" in text and "Protocol after-all" in text
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in text
    assert "MOSE settings" in text
    baselines = {**study, "methods": {m: r for m, r in study["methods"].items() if m != "mose"}}
    text = render_markdown(baselines, title="baselines", header={})
    assert "MOSE settings" not in text and "- **layers**: [1, 2] (FT-M edits all of them" in text


def test_unknown_method(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="methods"):
        protocols.run_study(tiny_model, tiny_tokenizer, [], methods=["lora"], probes=PROBES, text="a b",
                            fluency_prompts=[])
