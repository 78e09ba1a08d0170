from __future__ import annotations

import pytest
import torch

from mose_kernels.editing.tokens import (
    batch_prompt_targets,
    encode_prompt_target,
    join_prompt_target,
    subject_token_span,
)


@pytest.mark.parametrize(
    ("prompt", "target", "expected"),
    [
        pytest.param("The capital is", "Paris", ("The capital is", " Paris"), id="adds-space"),
        pytest.param("The capital is ", " Paris", ("The capital is", " Paris"), id="one-space-only"),
        pytest.param("The capital is", "  Paris", ("The capital is", " Paris"), id="collapses"),
        pytest.param("Hello", ", world", ("Hello", ", world"), id="punctuation"),
    ],
)
def test_join(prompt, target, expected):
    assert join_prompt_target(prompt, target) == expected


def test_encode_matches_joined_text(tokenizer):
    with_space = encode_prompt_target(tokenizer, "The capital of France is", " Paris")
    without = encode_prompt_target(tokenizer, "The capital of France is", "Paris")
    assert torch.equal(with_space.input_ids, without.input_ids)
    full = tokenizer("The capital of France is Paris")["input_ids"]
    assert with_space.input_ids.tolist() == full
    assert tokenizer.decode(with_space.target_ids) == " Paris"
    with pytest.raises(ValueError, match="empty"):
        encode_prompt_target(tokenizer, "The capital of France is", " ")


def test_batch_labels(tokenizer):
    pairs = [("The capital of France is", "Paris"), ("Apple was founded by", "Steve Jobs")]
    ids, mask, labels = batch_prompt_targets(tokenizer, pairs)
    assert ids.shape == mask.shape == labels.shape
    for i, (p, t) in enumerate(pairs):
        e = encode_prompt_target(tokenizer, p, t)
        n = e.input_ids.numel()
        assert torch.equal(ids[i, :n], e.input_ids) and mask[i, :n].all() and not mask[i, n:].any()
        assert (labels[i, : e.prompt_length] == -100).all() and (labels[i, n:] == -100).all()
        assert torch.equal(labels[i, e.prompt_length : n], e.target_ids)


def test_subject_span(tokenizer):
    prompt = "The mother tongue of Danielle Darrieux is"
    start, end = subject_token_span(tokenizer, prompt, "Danielle Darrieux")
    ids = tokenizer(prompt)["input_ids"]
    assert tokenizer.decode(ids[start:end]).strip() == "Danielle Darrieux"
    with pytest.raises(ValueError, match="does not occur"):
        subject_token_span(tokenizer, prompt, "Rome")
