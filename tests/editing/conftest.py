"""Tiny models and a tokenizer for the editing tests, built in memory (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

FACTS = [
    ("The capital of France is", "Paris"),
    ("The capital of Italy is", "Rome"),
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("Apple was founded by", "Steve Jobs"),
    ("The Eiffel Tower is located in", "Paris"),
    ("Michel Rocard is a native speaker of", "French"),
]
EXTRA_WORDS = "London Berlin English German Microsoft Google Toyota Japan Madrid Spanish the a of is in by"


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [f"{p} {t}." for p, t in FACTS] * 20 + [EXTRA_WORDS] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_model(kind: str, vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=3, n_head=2, n_inner=96,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(config)
    elif kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(kind)
    return model.eval()


def overfit(model, tokenizer, facts=FACTS, steps: int = 60):
    """Teach the tiny model a few facts so an edit has something to change."""
    from mose_kernels.editing.tokens import batch_prompt_targets

    ids, mask, labels = batch_prompt_targets(tokenizer, facts)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def _trained(tokenizer):
    return {kind: overfit(build_model(kind, len(tokenizer)), tokenizer) for kind in ("gpt2", "llama")}


@pytest.fixture(params=["gpt2", "llama"])
def model(request, _trained):
    """A fresh copy of a tiny trained model (GPT-2: Conv1D (in, out); LLaMA: Linear (out, in))."""
    import copy

    return copy.deepcopy(_trained[request.param])
