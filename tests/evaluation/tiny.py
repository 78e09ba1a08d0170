"""A tiny LLaMA and a byte-level BPE tokenizer trained on the shipped demo data, built in memory
(nothing is downloaded); saved to a folder they load like any transformers model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mose_kernels.cli import DEMO_REQUESTS, PERPLEXITY_TEXT, PROBE_FACTS


def corpus() -> list[str]:
    """Every text of the shipped data: requests (all fields), probe facts and the perplexity text."""
    texts = [PERPLEXITY_TEXT.read_text()]
    for r in json.loads(DEMO_REQUESTS.read_text()):
        texts.append(f"{r['prompt']} {r['ground_truth']}. {r['prompt']} {r['target_new']}.")
        texts += [f"{p} {r['ground_truth']}" for p in r["rephrase_prompt"]]
        texts += [f"{p} {a}" for p, a in zip(r["locality_prompt"], r["locality_ground_truth"], strict=True)]
    texts += [f"{f['prompt']} {f['answer']}" for f in json.loads(PROBE_FACTS.read_text())]
    return texts


def build_tokenizer(vocab_size: int = 1200):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def build_llama(vocab_size: int, seed: int = 0, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def save_tiny_model(folder: Path) -> Path:
    """Write a tiny random LLaMA and its tokenizer to ``folder``; returns ``folder``."""
    tokenizer = build_tokenizer()
    model = build_llama(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
