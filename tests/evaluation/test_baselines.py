"""Additive baselines: each edits only its projection(s), and the closed forms do what they claim."""

from __future__ import annotations

import pytest
import torch

from mose_kernels.editing.requests import EditRequest
from mose_kernels.editing.solvers.common import TargetBatch, target_nll
from mose_kernels.evaluation.baselines import (
    FineTuneEditor,
    NullSpaceEditor,
    RankOneEditor,
    key_second_moment,
    maths_weight,
)

REQ = EditRequest(prompt="The capital of France is", subject="France", target_new="Rome", ground_truth="Paris")
CORPUS = ["The old bridge at the edge of the town was built of grey stone.",
          "A good cup of tea needs only a few things: fresh water, a clean pot and good leaves.",
          "Many birds leave the northern countries in autumn and fly south."] * 4


def _changed(before: dict, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


def _nll(model, tokenizer, request=REQ) -> float:
    with torch.no_grad():
        return float(target_nll(model, TargetBatch.build(tokenizer, request, (), "cpu"))[0])


def test_fine_tune_lowers_the_target_loss_and_touches_only_its_layers(tiny_model, tiny_tokenizer):
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    loss0 = _nll(tiny_model, tiny_tokenizer)
    editor = FineTuneEditor(tiny_model, tiny_tokenizer, [1, 2], steps=10, lr=1e-2)
    (result,) = editor.edit([REQ])
    assert _nll(tiny_model, tiny_tokenizer) < loss0
    assert result.final_loss == pytest.approx(_nll(tiny_model, tiny_tokenizer), rel=1e-4)
    edited = {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    assert _changed(before, tiny_model) == edited
    assert all(not p.requires_grad or p.grad is None for p in tiny_model.parameters())


def test_rank_one_edit_maps_the_key_to_the_value(tiny_model, tiny_tokenizer):
    editor = RankOneEditor(tiny_model, tiny_tokenizer, 2, value_steps=15, corpus=CORPUS)
    key, value, *_ = editor.key_value(REQ)
    w0 = maths_weight(editor.target).double().clone()
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    loss0 = _nll(tiny_model, tiny_tokenizer)
    editor.edit([REQ])
    w1 = maths_weight(editor.target).double()
    torch.testing.assert_close(w1 @ key, value, rtol=1e-4, atol=1e-4)
    assert torch.linalg.matrix_rank(w1 - w0, rtol=1e-6) == 1
    assert _changed(before, tiny_model) == {"model.layers.2.mlp.down_proj.weight"}
    assert _nll(tiny_model, tiny_tokenizer) < loss0


def test_null_space_edit_leaves_corpus_keys_alone(tiny_model, tiny_tokenizer):
    editor = NullSpaceEditor(tiny_model, tiny_tokenizer, 2, value_steps=15, corpus=CORPUS, null_tol=1e-2)
    moment = key_second_moment(tiny_model, tiny_tokenizer, editor.target, CORPUS)
    evals, evecs = torch.linalg.eigh(moment)
    kept = evecs[:, evals >= 1e-2 * evals.max()]
    w0 = maths_weight(editor.target).double().clone()
    editor.edit([REQ])
    delta = maths_weight(editor.target).double() - w0
    assert delta.norm() > 0
    assert (delta @ kept).norm() <= 1e-5 * delta.norm()


def test_rank_one_rejects_an_empty_corpus(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="no tokens"):
        RankOneEditor(tiny_model, tiny_tokenizer, 1, corpus=[])
