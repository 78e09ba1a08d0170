"""Metric definitions checked against direct computations on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mose_kernels.editing.requests import EditRequest
from mose_kernels.editing.tokens import encode_prompt_target
from mose_kernels.evaluation import metrics

REQ = EditRequest(
    prompt="The capital of France is", subject="France", target_new="Rome", ground_truth="Paris",
    rephrase_prompts=("France's capital city is",), locality_prompts=("The capital of Germany is",),
    locality_answers=("Berlin",),
)


def _direct(model, tokenizer, prompt, target):
    enc = encode_prompt_target(tokenizer, prompt, target)
    with torch.no_grad():
        logits = model(input_ids=enc.input_ids.unsqueeze(0)).logits[0, :-1]
    pos = torch.arange(enc.prompt_length - 1, enc.input_ids.numel() - 1)
    nll = F.cross_entropy(logits[pos], enc.target_ids).item()
    return logits[pos].argmax(-1), enc.target_ids, nll


def test_teacher_forced_matches_unbatched_forward(tiny_model, tiny_tokenizer):
    pairs = [("The capital of France is", "Rome"), ("Bees make", "honey"),
             ("The novel War and Peace was written by", "Leo Tolstoy")]
    scored = metrics.teacher_forced(tiny_model, tiny_tokenizer, pairs, batch_size=2)
    for (prompt, target), s in zip(pairs, scored, strict=True):
        pred, tgt, nll = _direct(tiny_model, tiny_tokenizer, prompt, target)
        assert torch.equal(s.target, tgt)
        assert torch.equal(s.predicted, pred)
        assert s.nll == pytest.approx(nll, rel=1e-4)
        assert s.accuracy == pytest.approx(float((pred == tgt).float().mean()))
        assert s.prob == pytest.approx(math.exp(-nll), rel=1e-4)


def test_unedited_model_has_perfect_locality_and_consistent_probabilities(tiny_model, tiny_tokenizer):
    ref = metrics.locality_reference(tiny_model, tiny_tokenizer, [REQ])
    (scores,) = metrics.score_requests(tiny_model, tiny_tokenizer, [REQ], ref)
    assert scores["locality_acc"] == 1.0
    _, _, nll_new = _direct(tiny_model, tiny_tokenizer, REQ.prompt, REQ.target_new)
    _, _, nll_true = _direct(tiny_model, tiny_tokenizer, REQ.prompt, REQ.ground_truth)
    assert scores["efficacy_success"] == float(nll_new < nll_true)
    assert scores["efficacy_magnitude"] == pytest.approx(math.exp(-nll_new) - math.exp(-nll_true), abs=1e-6)
    _, _, nll_loc = _direct(tiny_model, tiny_tokenizer, REQ.locality_prompts[0], "Berlin")
    _, _, nll_loc_new = _direct(tiny_model, tiny_tokenizer, REQ.locality_prompts[0], "Rome")
    assert scores["neighborhood_success"] == float(nll_loc < nll_loc_new)


def test_locality_detects_a_changed_model(tiny_model, tiny_tokenizer):
    ref = metrics.locality_reference(tiny_model, tiny_tokenizer, [REQ])
    with torch.no_grad():
        tiny_model.lm_head.weight.copy_(torch.randn_like(tiny_model.lm_head.weight) * 5)
    (scores,) = metrics.score_requests(tiny_model, tiny_tokenizer, [REQ], ref)
    assert scores["locality_acc"] < 1.0


def test_missing_fields_give_none_and_summaries_skip_them(tiny_model, tiny_tokenizer):
    bare = EditRequest(prompt="Bees make", subject="Bees", target_new="wax")
    scores = metrics.score_requests(tiny_model, tiny_tokenizer, [bare, REQ],
                                    metrics.locality_reference(tiny_model, tiny_tokenizer, [bare, REQ]))
    assert scores[0]["efficacy_success"] is None and scores[0]["rephrase_acc"] is None
    assert scores[0]["locality_acc"] is None and scores[0]["rewrite_acc"] is not None
    summary = metrics.summarize(scores)
    assert summary["locality_acc"] == scores[1]["locality_acc"]
    assert summary["rewrite_acc"] == pytest.approx((scores[0]["rewrite_acc"] + scores[1]["rewrite_acc"]) / 2)


def test_score_requests_rejects_a_mismatched_reference(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="reference"):
        metrics.score_requests(tiny_model, tiny_tokenizer, [REQ], [])


def test_ngram_entropy_values():
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert metrics.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert metrics.ngram_entropy("") == 0.0
    repetitive = "the cat the cat the cat the cat the cat the cat"
    varied = "the quick brown fox jumps over the lazy dog near a quiet river bank"
    assert metrics.ngram_entropy(repetitive) < metrics.ngram_entropy(varied)
    with pytest.raises(ValueError, match="same length"):
        metrics.ngram_entropy("a b", ns=(2,), weights=(1.0, 2.0))


def test_perplexity_matches_cross_entropy_and_windows(tiny_model, tiny_tokenizer):
    text = "The old bridge at the edge of the town was built of grey stone."
    ids = tiny_tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = tiny_model(input_ids=ids).logits[0, :-1]
    expected = math.exp(F.cross_entropy(logits, ids[0, 1:]).item())
    assert metrics.perplexity(tiny_model, tiny_tokenizer, text, window=512) == pytest.approx(expected, rel=1e-4)
    windowed = metrics.perplexity(tiny_model, tiny_tokenizer, text, window=4)
    assert math.isfinite(windowed) and windowed != pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="window"):
        metrics.perplexity(tiny_model, tiny_tokenizer, text, window=1)


def test_probe_agreement_is_one_for_the_base_model(tiny_model, tiny_tokenizer):
    facts = [("Bees make", "honey"), ("The first month of the year is", "January")]
    ref = [s.predicted for s in metrics.teacher_forced(tiny_model, tiny_tokenizer, facts)]
    assert metrics.probe_agreement(tiny_model, tiny_tokenizer, facts, ref) == 1.0
    with pytest.raises(ValueError, match="reference"):
        metrics.probe_agreement(tiny_model, tiny_tokenizer, facts, ref[:1])


def test_fluency_generates_greedily(tiny_model, tiny_tokenizer):
    entropy, texts = metrics.fluency(tiny_model, tiny_tokenizer, ["Bees make", "The sun rises in the"], 6)
    again = metrics.greedy_generate(tiny_model, tiny_tokenizer, "Bees make", 6)
    assert len(texts) == 2 and texts[0] == again
    assert entropy == pytest.approx(sum(metrics.ngram_entropy(t) for t in texts) / 2)


def test_weight_stability_orthogonal_versus_additive():
    torch.manual_seed(0)
    w0 = torch.randn(12, 20, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    rotated = metrics.weight_stability(w0 @ q, w0)
    base = metrics.weight_stability(w0, w0)
    assert rotated["fro_norm"] == pytest.approx(base["fro_norm"], rel=1e-12)
    assert rotated["cond"] == pytest.approx(base["cond"], rel=1e-10)
    assert rotated["max_sv_rel_change"] < 1e-12 and rotated["rel_change"] > 0.5
    added = metrics.weight_stability(w0 + 3 * torch.outer(torch.randn(12), torch.randn(20)).double(), w0)
    assert added["fro_norm"] > base["fro_norm"] and added["max_sv_rel_change"] > 0.1
    with pytest.raises(ValueError, match="shape"):
        metrics.weight_stability(w0, w0.T)


def test_report_names_the_keep_corpus():
    """The report header says which keep corpus MOSE used (shipped, model samples or the user's)."""
    from mose_kernels.editing.config import EditConfig
    from mose_kernels.evaluation.report import _settings

    assert _settings(EditConfig().to_dict())["keep_corpus"] == "shipped keep_corpus.txt"
    assert _settings(EditConfig(keep_corpus="model-samples").to_dict())["keep_corpus"] == "model-samples"
    assert _settings(EditConfig(keep_corpus=["a b", "c d"]).to_dict())["keep_corpus"] == "2 texts"
    assert "keep_corpus" not in _settings(EditConfig(keep_corpus_dirs=0).to_dict())


def test_known_fact_generalisation_scores_the_true_object_on_prompt_and_paraphrases(tiny_model, tiny_tokenizer):
    other = EditRequest(prompt="Bees make", subject="Bees", target_new="wax", ground_truth="honey",
                        rephrase_prompts=("What bees make is", "Bees produce"))
    no_truth = EditRequest(prompt="Bees make", subject="Bees", target_new="wax", rephrase_prompts=("Bees produce",))
    got = metrics.known_fact_generalisation(tiny_model, tiny_tokenizer, [REQ, other, no_truth], batch_size=2)
    acc = {}
    for r in (REQ, other):
        pred, tgt, _ = _direct(tiny_model, tiny_tokenizer, r.prompt, r.ground_truth)
        para = [_direct(tiny_model, tiny_tokenizer, p, r.ground_truth)[:2] for p in r.rephrase_prompts]
        acc[r] = (float((pred == tgt).float().mean()), sum(float((a == b).float().mean()) for a, b in para) / len(para))
    assert got["requests"] == 2  # the request without a ground truth is left out
    assert got["prompt_acc"] == pytest.approx((acc[REQ][0] + acc[other][0]) / 2)
    assert got["rephrase_acc"] == pytest.approx((acc[REQ][1] + acc[other][1]) / 2)
    known = [acc[r][1] for r in (REQ, other) if acc[r][0] == 1.0]
    assert got["known"] == len(known)
    assert got["known_rephrase_acc"] == (pytest.approx(sum(known) / len(known)) if known else None)


def test_known_fact_generalisation_of_a_model_that_knows_its_facts(tiny_model, tiny_tokenizer):
    """Overfit the tiny model on one fact's prompt and paraphrase: both are then known."""
    from tests.editing.conftest import overfit

    fact = EditRequest(prompt="The capital of France is", subject="France", target_new="Rome", ground_truth="Paris",
                       rephrase_prompts=("France's capital city is",))
    overfit(tiny_model, tiny_tokenizer, [(fact.prompt, "Paris"), (fact.rephrase_prompts[0], "Paris")], steps=80)
    got = metrics.known_fact_generalisation(tiny_model, tiny_tokenizer, [fact])
    assert got == {"requests": 1, "prompt_acc": 1.0, "rephrase_acc": 1.0, "known": 1, "known_rephrase_acc": 1.0}
