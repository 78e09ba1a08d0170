"""The benchmark suite in its quick mode (small shapes, one repetition), so it never rots: it must
run every provider, agree with a float64 reference, write well-formed JSON and render it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import report, run
from bench.lapack import to_lapack
from bench.registry import providers
from mose_kernels import householder_matrix

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    assert run.main(["--quick", "--editing", "on", "--editing-edits", "1", "--out", str(out), "--no-reexec"]) == 0
    return json.loads(out.read_text())


def test_quick_run_is_well_formed(quick_results: dict) -> None:
    doc = quick_results
    assert doc["schema"] == run.SCHEMA
    for key in ("date", "platform", "cpu", "versions", "torch_threads"):
        assert key in doc["machine"], key
    assert doc["ceilings"]["copy_bytes_per_s"] > 0 and doc["ceilings"]["gemm_flops_per_s"]["fp32"] > 0
    rows = doc["rows"]
    expected = {p.name for p in providers(torch.device("cpu"))}
    assert {r["provider"] for r in rows if r["status"] == "ok"} == expected
    assert {r["op"] for r in rows} == {"wy_factor", "fwd", "fwd_inplace", "bwd_V", "bwd_VW"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and math.isfinite(r["gb_per_s"]) and r["pct_floor"] > 0
        assert r["reps"] == len(r["times_s"]) >= 1
        if r["op"] in ("fwd", "fwd_inplace"):
            assert r["rel_err"] < 1e-5, r  # every provider computes the same product
    fwd = [r for r in rows if r["op"] == "fwd"]
    assert all("speedup_vs_torch_wy" in r for r in fwd)


def test_quick_editing_section(quick_results: dict) -> None:
    import mose_kernels.editing

    editing = quick_results["editing"]
    authors = next(r for r in editing["rows"] if r["method"] == "authors_cayley")
    assert authors["status"] == "ok", authors
    if not hasattr(mose_kernels.editing, "MoseEditor"):
        pytest.skip("mose_kernels.editing.MoseEditor is not in this checkout yet")
    assert editing["model"] == "tiny-llama" and editing["edits"] == 1
    by_method = {r["method"]: r for r in editing["rows"]}
    assert {"mose:gradient", "mose:procrustes", "authors_cayley"} <= set(by_method)
    for method in ("mose:gradient", "authors_cayley"):
        row = by_method[method]
        assert row["status"] == "ok", row
        assert row["seconds_per_edit"] > 0 and 0.0 <= row["efficacy_after_all"] <= 1.0


def test_render(quick_results: dict, tmp_path: Path) -> None:
    results = tmp_path / "quick.json"
    results.write_text(json.dumps(quick_results))
    readme = tmp_path / "README.md"
    readme.write_text(f"# bench\n\n{report.START}\nold\n{report.END}\n")
    report.render(results, readme)
    text = readme.read_text()
    assert "old" not in text and "**fwd, side=right**" in text and "Editing throughput" in text
    assert (tmp_path / "quick.png").stat().st_size > 0 and (tmp_path / "quick.md").read_text().count("\n") > 10


def test_hopeless_rows_are_skipped_with_an_estimate(tmp_path: Path) -> None:
    out = tmp_path / "skip.json"
    run.main(["--quick", "--shapes", "tiny", "--ks", "1", "--ops", "fwd", "--max-call-s", "1e-12",
              "--editing", "off", "--out", str(out), "--no-reexec"])
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["status"] == "skipped" and r["est_s"] > 0 and "estimated" in r["reason"] for r in rows)


@pytest.mark.parametrize("k, n", [(1, 9), (5, 40), (24, 64)])
def test_lapack_storage_is_the_same_operator(k: int, n: int) -> None:
    V = torch.randn(k, n, dtype=torch.float64)
    A, tau = to_lapack(V)
    assert torch.equal(torch.triu(A, 1), torch.zeros_like(A)) and torch.equal(A.diagonal(), torch.ones(k).double())
    Q = torch.linalg.householder_product(torch.nn.functional.pad(A, (0, n - k)), tau)
    torch.testing.assert_close(Q, householder_matrix(V), rtol=0, atol=1e-12)


def test_half_precision_drift_master_stays_one_rounding_from_exact(tmp_path: Path) -> None:
    """``bench/half_precision_drift.py``: with the fp32 master the stored weight stays one rounding
    from the exact product however many edits; stored edit by edit it walks away from it."""
    from bench import half_precision_drift

    out = tmp_path / "drift.json"
    argv = ["--shape", "24x40", "--edits", "30", "--checkpoints", "1,10", "--angles", "0.05",
            "--dtypes", "bf16,fp16", "--out", str(out)]
    assert half_precision_drift.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["shape"] == [24, 40] and doc["side"] == "input"
    rows = {(r["dtype"], r["storage"], r["edits"]): r for r in doc["rows"]}
    assert len(rows) == 2 * 2 * 3
    for dtype, unit_roundoff in (("bfloat16", 2.0**-8), ("float16", 2.0**-11)):
        for edits in (1, 10, 30):
            master = rows[dtype, "master", edits]
            assert master["rel_error"] <= unit_roundoff and abs(master["change_kept"] - 1) < 0.05, master
        assert rows[dtype, "in_place", 30]["rel_error"] > 2 * rows[dtype, "master", 30]["rel_error"]
    assert half_precision_drift.main(["--shape", "24x40", "--dtypes", "fp8"]) == 2


def test_keep_memory_cap_bounds_the_stored_state(tmp_path: Path) -> None:
    """``bench/keep_memory.py``: the stored keep state is ``n x dim + dim x dim`` float64, so the
    capped run holds at most ``n * cap + cap^2`` doubles and fills to the cap; bad caps exit 2."""
    from bench import keep_memory

    out = tmp_path / "keep.jsonl"
    assert keep_memory.main(["--n", "200", "--max-dim", "40", "--edits", "12", "--out", str(out)]) == 0
    assert keep_memory.main(["--n", "200", "--edits", "12", "--out", str(out)]) == 0
    capped, uncapped = (json.loads(line) for line in out.read_text().splitlines())
    assert capped["max_dim"] == 40 and 36 <= capped["final_dim"] <= 40
    assert capped["peak_stored_mib"] <= (200 * 40 + 40 * 40) * 8 / 2**20 + 0.05
    assert uncapped["max_dim"] == 150 and uncapped["final_dim"] == 12 * 9
    assert uncapped["peak_stored_mib"] > capped["peak_stored_mib"]
    assert keep_memory.main(["--n", "200", "--max-dim", "300"]) == 2


def test_paraphrase_yardstick_runs_on_a_saved_model(tmp_path: Path) -> None:
    """``bench/paraphrase_yardstick.py`` on a tiny saved LLaMA and a two-record requests file:
    one JSON line with the counts of the metric; records out of range exit 2."""
    from bench import paraphrase_yardstick
    from tests.evaluation.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny")
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([
        {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome", "ground_truth": "Paris",
         "rephrase_prompt": "France's capital city is"},
        {"prompt": "Bees make", "subject": "Bees", "target_new": "wax", "ground_truth": "honey"},
    ]))
    out = tmp_path / "yardstick.jsonl"
    argv = ["--model", str(model_dir), "--requests", str(requests), "--out", str(out)]
    assert paraphrase_yardstick.main(argv) == 0
    (line,) = (json.loads(x) for x in out.read_text().splitlines())
    assert line["records"] == [0, 2] and line["requests"] == 1  # the second record has no paraphrase
    assert 0.0 <= line["prompt_acc"] <= 1.0 and 0.0 <= line["rephrase_acc"] <= 1.0 and line["known"] in (0, 1)
    assert paraphrase_yardstick.main([*argv, "--start", "5"]) == 2


def test_edit_memory_reports_the_editor_state_and_each_edit(tmp_path: Path, monkeypatch) -> None:
    """``bench/edit_memory.py`` on the tiny LLaMA: one row per edit, the editor's state by part
    (no fp32 master for an fp32 model; the journal holds 3 layers x 8 vectors x n floats per edit)."""
    from bench import edit_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # no re-exec inside the test process
    out = tmp_path / "memory.json"
    assert edit_memory.main(["--model", "tiny-llama", "--edits", "2", "--steps", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    n, layers = doc["n"], doc["layers"]
    assert doc["model"] == "tiny-llama" and [row["edit"] for row in doc["edits"]] == [0, 1]
    assert all(row["steps"] <= 2 for row in doc["edits"])
    assert doc["state"]["fp32_masters_mib"] == 0.0
    assert doc["state"]["journal_vectors_mib"] == pytest.approx(2 * layers * 8 * n * 4 / 2**20)
    assert doc["dense_q_per_layer_fp32_mib"] == pytest.approx(n * n * 4 / 2**20)
