from __future__ import annotations

import json

import pytest

from mose_kernels.editing.requests import EditRequest, detect_format, load_requests

FLAT = {
    "case_id": 0,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}
MEMIT = {
    "case_id": 7,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
    },
    "paraphrase_prompts": ["Danielle Darrieux speaks", "Danielle Darrieux grew up speaking"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of"],
}
ZSRE = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: john goodman's character in the big lebowski",
    "loc_ans": "Walter Sobchak",
}


def test_from_dict_flat():
    r = EditRequest.from_dict(FLAT)
    assert r.rephrase_prompts == (FLAT["rephrase_prompt"],)
    assert r.locality_answers == ("French",)
    assert r.case_id == "0"
    assert EditRequest.from_dict(r.to_dict()) == r


@pytest.mark.parametrize(
    ("record", "fmt", "prompt", "target", "n_loc"),
    [
        pytest.param(FLAT, "easyedit", FLAT["prompt"], "English", 1, id="easyedit"),
        pytest.param(MEMIT, "memit", "The mother tongue of Danielle Darrieux is", "English", 1, id="memit"),
        pytest.param(ZSRE, "zsre", ZSRE["src"], "unmanned aircraft", 1, id="zsre"),
    ],
)
def test_load_formats(tmp_path, record, fmt, prompt, target, n_loc):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([record, record]))
    assert detect_format(record) == fmt
    for format in ("auto", fmt):
        reqs = load_requests(path, format=format, limit=1)
        assert len(reqs) == 1
        assert reqs[0].prompt == prompt and reqs[0].target_new == target
        assert len(reqs[0].locality_prompts) == n_loc == len(reqs[0].locality_answers)


def test_load_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (FLAT, ZSRE)))
    assert [r.target_new for r in load_requests(path)] == ["English", "unmanned aircraft"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        pytest.param({"subject": "Nobody"}, "does not occur", id="subject-not-in-prompt"),
        pytest.param({"target_new": "  "}, "target_new is empty", id="empty-target"),
        pytest.param({"prompt": None}, "must be a str", id="prompt-none"),
        pytest.param({"rephrase_prompt": 3}, "rephrase_prompt", id="bad-rephrase"),
    ],
)
def test_bad_records_name_file_index_field(tmp_path, change, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([FLAT, {**FLAT, **change}]))
    with pytest.raises(ValueError, match=match) as info:
        load_requests(path)
    assert "record 1" in str(info.value) and "bad.json" in str(info.value)


def test_missing_field_and_unknown_format(tmp_path):
    path = tmp_path / "bad.json"
    record = dict(FLAT)
    del record["subject"]
    path.write_text(json.dumps([record]))
    with pytest.raises(ValueError, match="'subject'"):
        load_requests(path, format="easyedit")
    with pytest.raises(ValueError, match="cannot detect"):
        load_requests(_write(tmp_path, [{"foo": 1}]))
    with pytest.raises(ValueError, match="format must be"):
        load_requests(path, format="csv")


def _write(tmp_path, data):
    path = tmp_path / "other.json"
    path.write_text(json.dumps(data))
    return path


def test_locality_lengths_must_match():
    with pytest.raises(ValueError, match="pair up"):
        EditRequest("a b", "a", "c", locality_prompts=("x",), locality_answers=())


def test_shared_counterfact(shared_data):
    reqs = load_requests(shared_data / "counterfact-edit.json", limit=50)
    assert len(reqs) == 50 and all(r.subject in r.prompt for r in reqs)
    zs = load_requests(shared_data / "zsre_mend_train-1k.json", limit=20)
    assert len(zs) == 20 and all(r.ground_truth for r in zs)
