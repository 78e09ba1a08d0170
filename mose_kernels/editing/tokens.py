"""Tokenising prompts and targets: the one place that handles the target's leading space.

``" Paris"`` and ``"Paris"`` are different tokens for byte-level BPE tokenizers, so a target is
always joined to its prompt as text (``prompt.rstrip() + " " + target`` unless the target starts
with whitespace or punctuation) and the target tokens are what the joined text adds after the
prompt's tokens.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch
from torch import Tensor

_NO_SPACE_BEFORE = set(string.punctuation) - {"(", "[", "{", '"', "'", "$", "#", "@", "&", "*", "-", "<"}


@dataclass(frozen=True)
class PromptTarget:
    """Token ids of a prompt followed by its target.

    Attributes:
        input_ids: ``(L,)`` int64, prompt tokens then target tokens (a BOS only if the tokenizer
            adds one).
        prompt_length: number of prompt tokens; the target is ``input_ids[prompt_length:]``.
    """

    input_ids: Tensor
    prompt_length: int

    @property
    def target_ids(self) -> Tensor:
        """``(L - prompt_length,)`` target token ids."""
        return self.input_ids[self.prompt_length :]


def join_prompt_target(prompt: str, target: str) -> tuple[str, str]:
    """Return ``(prompt_text, target_text)`` such that their concatenation is the full text.

    The prompt loses trailing whitespace; the target gains exactly one leading space unless it
    already starts with whitespace or with punctuation such as ``,`` or ``.``.
    """
    if not isinstance(prompt, str) or not isinstance(target, str):
        raise TypeError(f"prompt and target must be str, got {type(prompt).__name__}, {type(target).__name__}")
    if not target.strip():
        raise ValueError(f"target is empty (prompt {prompt!r})")
    prompt = prompt.rstrip()
    if target[0].isspace():
        target = " " + target.lstrip()
    elif target[0] not in _NO_SPACE_BEFORE and prompt:
        target = " " + target
    return prompt, target


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_prompt_target(tokenizer, prompt: str, target: str) -> PromptTarget:
    """Tokenise ``prompt`` and ``target`` joined as text (see :func:`join_prompt_target`).

    The prompt is tokenised with the tokenizer's special tokens (a BOS if it adds one). The
    target tokens are the suffix of the joined text's tokens when the prompt's tokens are a
    prefix of them; otherwise (a merge across the boundary) the target is tokenised on its own.
    """
    prompt_text, target_text = join_prompt_target(prompt, target)
    prompt_ids = _ids(tokenizer, prompt_text, special=True)
    full_ids = _ids(tokenizer, prompt_text + target_text, special=True)
    # Some tokenizers append EOS; drop trailing special tokens shared by both encodings.
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    while prompt_ids and full_ids and prompt_ids[-1] in specials and full_ids[-1] == prompt_ids[-1]:
        prompt_ids, full_ids = prompt_ids[:-1], full_ids[:-1]
    if len(full_ids) > len(prompt_ids) and full_ids[: len(prompt_ids)] == prompt_ids:
        target_ids = full_ids[len(prompt_ids) :]
    else:
        target_ids = _ids(tokenizer, target_text, special=False)
    if not target_ids:
        raise ValueError(f"target {target!r} produced no tokens after prompt {prompt!r}")
    ids = torch.tensor(prompt_ids + target_ids, dtype=torch.long)
    return PromptTarget(input_ids=ids, prompt_length=len(prompt_ids))


def encode_prompt(tokenizer, prompt: str) -> Tensor:
    """``(L,)`` token ids of a prompt alone, normalised as in :func:`encode_prompt_target`."""
    return torch.tensor(_ids(tokenizer, prompt.rstrip(), special=True), dtype=torch.long)


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def batch_prompts(
    tokenizer, prompts: list[str], device: torch.device | str | None = None, max_tokens: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded batch of prompts alone: ``(input_ids, attention_mask, last)`` with ``last``
    ``(B,)`` the position of each prompt's last token; ``max_tokens`` keeps each prompt's first
    tokens only."""
    if not prompts:
        raise ValueError("batch_prompts needs at least one prompt")
    encoded = [encode_prompt(tokenizer, p)[:max_tokens] for p in prompts]
    length = max(e.numel() for e in encoded)
    input_ids = torch.full((len(encoded), length), pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, e in enumerate(encoded):
        input_ids[i, : e.numel()] = e
        attention_mask[i, : e.numel()] = 1
    last = torch.tensor([e.numel() - 1 for e in encoded])
    return input_ids.to(device), attention_mask.to(device), last.to(device)


def batch_prompt_targets(
    tokenizer, pairs: list[tuple[str, str]], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded batch of prompt + target sequences.

    Returns:
        ``(input_ids, attention_mask, labels)``, each ``(B, L)``. ``labels`` equals ``input_ids``
        on target tokens and ``-100`` elsewhere (prompt and padding), aligned with ``input_ids``
        as in Hugging Face models: the logits at position ``t`` predict the token at ``t + 1``,
        so the target token at ``t`` is scored by the logits at ``t - 1``.
    """
    if not pairs:
        raise ValueError("batch_prompt_targets needs at least one (prompt, target) pair")
    encoded = [encode_prompt_target(tokenizer, p, t) for p, t in pairs]
    length = max(e.input_ids.numel() for e in encoded)
    input_ids = torch.full((len(encoded), length), pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    labels = torch.full((len(encoded), length), -100, dtype=torch.long)
    for i, e in enumerate(encoded):
        n = e.input_ids.numel()
        input_ids[i, :n] = e.input_ids
        attention_mask[i, :n] = 1
        labels[i, e.prompt_length : n] = e.target_ids
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def subject_token_span(tokenizer, prompt: str, subject: str) -> tuple[int, int]:
    """Token positions ``[start, end)`` of the first occurrence of ``subject`` in ``prompt``
    (tokenised as by :func:`encode_prompt`); ``end - 1`` is the subject's last token."""
    prompt = prompt.rstrip()
    idx = prompt.find(subject)
    if idx < 0:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    start = len(_ids(tokenizer, prompt[:idx].rstrip(), special=True)) if prompt[:idx].strip() else None
    end = len(_ids(tokenizer, prompt[: idx + len(subject)], special=True))
    if start is None:
        start = len(_ids(tokenizer, "", special=True))
    total = len(_ids(tokenizer, prompt, special=True))
    end = min(max(end, 1), total)
    start = min(start, end - 1)
    return start, end
