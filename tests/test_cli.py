"""The ``mose`` command line, end to end on a tiny random LLaMA saved to a folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mose_kernels.cli import main
from mose_kernels.evaluation.report import PLOTS
from tests.evaluation.tiny import save_tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def _run(argv, capsys):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_demo_quick_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    status, stdout, _ = _run(["demo", "--quick", "--model", tiny_dir, "--out", out, "--steps", 4, "--no-progress",
                              "--jobs", 2], capsys)
    assert status == 0
    report = (out / "report.md").read_text()
    assert "Protocol after-each" in report and "Protocol after-all" in report
    assert "in each of 2 processes (one per method)" in report  # one process per method, merged
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"mose", "ft"}
    assert metrics["num_requests"] == 8 and metrics["protocols"] == ["after-each", "after-all"]
    for run in metrics["methods"].values():
        assert len(run["edits"]) == 8
        assert [p["edits"] for p in run["curve"]] == [0, 2, 4, 6, 8]
        assert 0.0 <= run["after_all"]["summary"]["locality_acc"] <= 1.0
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "before:" in stdout and str(out / "report.md") in stdout


def test_edit_replay_undo_round_trip(tiny_dir, tmp_path, capsys):
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([
        {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris"},
        {"prompt": "Bees make", "subject": "Bees", "target_new": "wax", "ground_truth": "honey"},
    ]))
    edited = tmp_path / "edited"
    status, stdout, _ = _run(["edit", "--model", tiny_dir, "--requests", requests, "--out", edited, "--steps", 3,
                              "--layers", "1,2", "--no-progress"], capsys)
    assert status == 0 and "2 edits" in stdout
    journal = json.loads((edited / "journal" / "journal.json").read_text())
    assert len(journal["entries"]) == 2

    replayed = tmp_path / "replayed"
    assert _run(["replay", "--model", tiny_dir, "--journal", edited / "journal", "--out", replayed], capsys)[0] == 0
    a, b = load_file(edited / "model" / "model.safetensors"), load_file(replayed / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)

    undone = tmp_path / "undone"
    status, _, _ = _run(["undo", "--model", edited / "model", "--journal", edited / "journal", "--out", undone],
                        capsys)
    assert status == 0
    assert len(json.loads((undone / "journal" / "journal.json").read_text())["entries"]) == 1
    base = load_file(tiny_dir / "model.safetensors")
    assert not torch.allclose(base[name], load_file(undone / "model" / "model.safetensors")[name])


def test_edit_batch_writes_one_journal_entry(tiny_dir, tmp_path, capsys):
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([
        {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome"},
        {"prompt": "Bees make", "subject": "Bees", "target_new": "wax"},
    ]))
    edited = tmp_path / "edited"
    status, stdout, _ = _run(["edit", "--model", tiny_dir, "--requests", requests, "--out", edited, "--batch",
                              "--solver", "procrustes", "--layers", "1", "--no-progress"], capsys)
    assert status == 0 and "2 edits" in stdout
    (entry,) = json.loads((edited / "journal" / "journal.json").read_text())["entries"]
    assert entry["request"]["target_new"] == "Rome" and entry["batch"][0]["target_new"] == "wax"
    status, _, stderr = _run(["edit", "--model", tiny_dir, "--requests", requests, "--out", edited, "--batch",
                              "--solver", "gradient"], capsys)
    assert status == 2 and "needs --solver procrustes" in stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--model", "{tiny}", "--requests", "{tmp}/missing.json", "--out", "{tmp}/o"], "not found"),
        (["eval", "--model", "no-such-model", "--requests", "{req}", "--out", "{tmp}/o"], "unknown model"),
        (["eval", "--model", "{tiny}", "--requests", "{bad}", "--out", "{tmp}/o"], "record 0"),
        (["eval", "--model", "{tiny}", "--requests", "{req}", "--baseline", "lora", "--out", "{tmp}/o"], "--baseline"),
        (["replay", "--model", "{tiny}", "--journal", "{tmp}", "--out", "{tmp}/o"], "not an edit journal"),
    ],
    ids=["missing-file", "unknown-model", "malformed-requests", "unknown-baseline", "not-a-journal"],
)
def test_user_errors_are_one_line_with_status_2(tiny_dir, tmp_path, capsys, argv, message):
    req = tmp_path / "ok.json"
    req.write_text(json.dumps([{"prompt": "Bees make", "subject": "Bees", "target_new": "wax"}]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "Bees make", "target_new": "wax"}]))
    fill = {"tiny": str(tiny_dir), "tmp": str(tmp_path), "req": str(req), "bad": str(bad)}
    status, _, stderr = _run([a.format(**fill) for a in argv], capsys)
    assert status == 2
    lines = [line for line in stderr.splitlines() if line.startswith("mose:")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in stderr


def test_eval_runs_merge_into_one_report(tiny_dir, tmp_path, capsys):
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([
        {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris",
         "rephrase_prompt": "France's capital city is", "locality_prompt": "Bees make",
         "locality_ground_truth": "honey"},
        {"prompt": "Bees make", "subject": "Bees", "target_new": "wax", "ground_truth": "honey"},
    ]))
    common = ["eval", "--model", tiny_dir, "--requests", requests, "--steps", 3, "--layers", "1,2",
              "--curve-points", 2, "--generations", 1, "--no-progress"]
    for method in ("mose", "ft"):
        assert _run([*common, "--methods", method, "--out", tmp_path / method], capsys)[0] == 0
    status, stdout, _ = _run(["merge", tmp_path / "mose", tmp_path / "ft", "--out", tmp_path / "both"], capsys)
    assert status == 0 and "FT-M" in stdout and "MOSE" in stdout
    merged = json.loads((tmp_path / "both" / "metrics.json").read_text())
    assert list(merged["methods"]) == ["mose", "ft"]
    for method in ("mose", "ft"):
        alone = json.loads((tmp_path / method / "metrics.json").read_text())
        assert merged["methods"][method] == alone["methods"][method]
    report = (tmp_path / "both" / "report.md").read_text()
    assert "MOSE (multiplicative)" in report and "FT-M (additive)" in report
    assert "mose eval" in report  # each run's command is kept
    for name in PLOTS:
        assert (tmp_path / "both" / name).read_bytes()[:8] == PNG_MAGIC
    assert not list((tmp_path / "both").glob(".*.tmp"))  # atomic writes leave no temp files

    # a baseline run needs the same edited layers only (it reads nothing else of the MOSE settings)
    assert _run([*common[:-7], "--steps", 5, "--layers", "1,2", "--curve-points", 2, "--generations", 1,
                 "--no-progress", "--methods", "ft", "--out", tmp_path / "ft5"], capsys)[0] == 0
    status, _, _ = _run(["merge", tmp_path / "ft5", tmp_path / "mose", "--out", tmp_path / "both5"], capsys)
    assert status == 0
    merged5 = json.loads((tmp_path / "both5" / "metrics.json").read_text())
    assert list(merged5["methods"]) == ["ft", "mose"] and merged5["config"] == merged["config"]
    # a run of a different study (other layers, other MOSE settings) or the same method twice is
    # refused in one line
    assert _run([*common[:-7], "--layers", "1", "--curve-points", 2, "--generations", 1, "--no-progress",
                 "--methods", "ft", "--out", tmp_path / "other"], capsys)[0] == 0
    status, _, stderr = _run(["merge", tmp_path / "mose", tmp_path / "other", "--out", tmp_path / "x"], capsys)
    assert status == 2 and "edited layers differ" in stderr
    status, _, stderr = _run(["merge", tmp_path / "mose", tmp_path / "both5", "--out", tmp_path / "x"], capsys)
    assert status == 2 and "appears twice" in stderr
    assert _run([*common[:-7], "--steps", 5, "--layers", "1,2", "--curve-points", 2, "--generations", 1,
                 "--no-progress", "--methods", "mose", "--out", tmp_path / "mose5"], capsys)[0] == 0
    status, _, stderr = _run(["merge", tmp_path / "ft", tmp_path / "mose", tmp_path / "mose5", "--out",
                              tmp_path / "x"], capsys)
    assert status == 2 and "MOSE settings differ" in stderr
    status, _, stderr = _run(["merge", tmp_path / "ft", tmp_path / "ft", "--out", tmp_path / "x"], capsys)
    assert status == 2 and "appears twice" in stderr
    status, _, stderr = _run(["merge", tmp_path / "ft", tmp_path / "nowhere", "--out", tmp_path / "x"], capsys)
    assert status == 2 and "not found" in stderr
