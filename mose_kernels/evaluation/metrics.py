"""Knowledge-editing metrics, each defined once (the definitions are collected in ``METRICS.md``).

Notation: a request has a prompt ``p``, a new target ``o*`` (``target_new``), an old target ``o``
(``ground_truth``), paraphrases ``p'`` and neighbourhood prompts ``n`` with answers ``a``. Targets
are joined to prompts by :func:`mose_kernels.editing.tokens.encode_prompt_target` (the one place
that handles the leading space). All scores are computed teacher-forced on the prompt followed by
the whole target: the logits at position ``t`` score the token at ``t + 1``.

Token-level (EasyEdit):
  - ``rewrite_acc`` (efficacy): fraction of the tokens of ``o*`` that are the argmax after ``p``.
  - ``rephrase_acc`` (generalisation): the same on each paraphrase ``p'``, averaged.
  - ``locality_acc``: fraction of the argmax tokens on ``n + a`` (teacher-forced on ``a``) that
    equal the *pre-edit* model's argmax tokens at the same positions.
Probability comparison (MEMIT CounterFact), with ``P(x | q) = exp(-mean token NLL of x after q)``:
  - ``efficacy_success``: ``P(o* | p) > P(o | p)``; ``efficacy_magnitude``: ``P(o* | p) - P(o | p)``.
  - ``paraphrase_success`` / ``_magnitude``: the same averaged over the paraphrases.
  - ``neighborhood_success``: ``P(a | n) > P(o* | n)``; ``neighborhood_magnitude``: the difference
    (CounterFact's neighbourhood answer ``a`` is the true object ``o``).
Health:
  - ``ngram_entropy``: weighted mean of the bigram and trigram entropies (bits) of the words of a
    greedy generation (weights 2/3 and 4/3 as in MEMIT); low values mean repetitive text.
  - ``perplexity``: ``exp`` of the mean token NLL of a text, in non-overlapping windows.
  - ``probe_agreement``: ``locality_acc`` on a fixed set of unedited facts.
Yardstick:
  - ``known_fact_generalisation``: ``rephrase_acc`` of the model's own facts (the true object
    ``o`` on the paraphrases) before any edit, overall and over the facts its prompt predicts.
Stability, per edited weight ``W`` against its base ``W0`` (singular values ``s``, ``s0``):
  - ``fro_norm`` ``||W||_F``, ``cond`` ``s_max / s_min``, ``max_sv_rel_change``
    ``max_i |s_i - s0_i| / s0_max``, ``rel_change`` ``||W - W0||_F / ||W0||_F``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mose_kernels.editing.requests import EditRequest
from mose_kernels.editing.tokens import batch_prompt_targets, encode_prompt, pad_id

# Per-request scores, in report order.
TOKEN_METRICS = ("rewrite_acc", "rephrase_acc", "locality_acc")
PROB_METRICS = (
    "efficacy_success",
    "efficacy_magnitude",
    "paraphrase_success",
    "paraphrase_magnitude",
    "neighborhood_success",
    "neighborhood_magnitude",
)
REQUEST_METRICS = TOKEN_METRICS + PROB_METRICS


@dataclass(frozen=True)
class TeacherForced:
    """Teacher-forced scores of one (prompt, target) pair.

    Attributes:
        predicted: ``(T,)`` argmax token ids at the target's positions.
        target: ``(T,)`` the target's token ids.
        nll: mean negative log-likelihood (nats) of the target tokens.
    """

    predicted: Tensor
    target: Tensor
    nll: float

    @property
    def accuracy(self) -> float:
        """Fraction of target tokens that are the argmax (EasyEdit's token accuracy)."""
        return float((self.predicted == self.target).float().mean())

    @property
    def prob(self) -> float:
        """``exp(-nll)``: geometric-mean token probability of the target (MEMIT's ``P``)."""
        return math.exp(-self.nll)


def _device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def teacher_forced(
    model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 32
) -> list[TeacherForced]:
    """Score each ``(prompt, target)`` pair teacher-forced, in batches.

    Returns:
        One :class:`TeacherForced` per pair, in order.
    """
    device = _device(model)
    out: list[TeacherForced] = []
    for start in range(0, len(pairs), batch_size):
        chunk = list(pairs[start : start + batch_size])
        ids, mask, labels = batch_prompt_targets(tokenizer, chunk, device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        shifted = labels[:, 1:].to(logits.device)  # the head's device under a device_map
        logp = F.log_softmax(logits, dim=-1)
        argmax = logits.argmax(-1)
        for row in range(len(chunk)):
            sel = shifted[row] != -100
            tgt = shifted[row][sel]
            nll = -logp[row][sel].gather(-1, tgt.unsqueeze(-1)).mean()
            out.append(TeacherForced(argmax[row][sel].cpu(), tgt.cpu(), float(nll)))
    return out


def _pairs_of(request: EditRequest) -> list[tuple[str, str, str]]:
    """The (kind, prompt, target) pairs one request needs, in a fixed order."""
    pairs = [("rewrite_new", request.prompt, request.target_new)]
    if request.ground_truth:
        pairs.append(("rewrite_true", request.prompt, request.ground_truth))
    for p in request.rephrase_prompts:
        pairs.append(("rephrase_new", p, request.target_new))
        if request.ground_truth:
            pairs.append(("rephrase_true", p, request.ground_truth))
    for p, a in zip(request.locality_prompts, request.locality_answers, strict=True):
        pairs.append(("locality_answer", p, a))
        pairs.append(("locality_new", p, request.target_new))
    return pairs


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


@torch.no_grad()
def locality_reference(
    model: nn.Module, tokenizer, requests: Sequence[EditRequest], batch_size: int = 32
) -> list[list[Tensor]]:
    """Argmax tokens of the (pre-edit) model on each request's neighbourhood prompts, teacher-forced
    on their answers: the reference ``locality_acc`` compares against."""
    pairs = [(p, a) for r in requests for p, a in zip(r.locality_prompts, r.locality_answers, strict=True)]
    scored = iter(teacher_forced(model, tokenizer, pairs, batch_size))
    return [[next(scored).predicted for _ in r.locality_prompts] for r in requests]


@torch.no_grad()
def score_requests(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    reference: Sequence[Sequence[Tensor]],
    batch_size: int = 32,
) -> list[dict[str, float | None]]:
    """Token-level and probability metrics of each request (see the module docstring).

    Args:
        reference: :func:`locality_reference` of the pre-edit model for the same requests.

    Returns:
        One dict per request with the keys of :data:`REQUEST_METRICS`; a metric whose inputs the
        request lacks (no ground truth, no paraphrase, no neighbourhood prompt) is ``None``.
    """
    if len(reference) != len(requests):
        raise ValueError(f"reference has {len(reference)} entries for {len(requests)} requests")
    kinds, pairs = [], []
    for r in requests:
        for kind, p, t in _pairs_of(r):
            kinds.append(kind)
            pairs.append((p, t))
    scored = iter(teacher_forced(model, tokenizer, pairs, batch_size))
    out = []
    for r, ref in zip(requests, reference, strict=True):
        got: dict[str, list[TeacherForced]] = {}
        for kind, _, _ in _pairs_of(r):
            got.setdefault(kind, []).append(next(scored))
        scores: dict[str, float | None] = dict.fromkeys(REQUEST_METRICS)
        scores["rewrite_acc"] = got["rewrite_new"][0].accuracy
        scores["rephrase_acc"] = _mean([s.accuracy for s in got.get("rephrase_new", [])])
        loc = got.get("locality_answer", [])
        scores["locality_acc"] = _mean(
            [float((s.predicted == base).float().mean()) for s, base in zip(loc, ref, strict=True)]
        )
        if r.ground_truth:
            new, true = got["rewrite_new"][0], got["rewrite_true"][0]
            scores["efficacy_success"] = float(new.nll < true.nll)
            scores["efficacy_magnitude"] = new.prob - true.prob
            para = list(zip(got.get("rephrase_new", []), got.get("rephrase_true", []), strict=True))
            scores["paraphrase_success"] = _mean([float(n.nll < t.nll) for n, t in para])
            scores["paraphrase_magnitude"] = _mean([n.prob - t.prob for n, t in para])
        neigh = list(zip(got.get("locality_answer", []), got.get("locality_new", []), strict=True))
        scores["neighborhood_success"] = _mean([float(a.nll < n.nll) for a, n in neigh])
        scores["neighborhood_magnitude"] = _mean([a.prob - n.prob for a, n in neigh])
        out.append(scores)
    return out


def summarize(scores: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Mean of each metric over the requests that have it (``None`` where none has it)."""
    keys = list(dict.fromkeys(k for s in scores for k in s))
    return {k: _mean([s[k] for s in scores if s.get(k) is not None]) for k in keys}


@torch.no_grad()
def known_fact_generalisation(
    model: nn.Module, tokenizer, requests: Sequence[EditRequest], batch_size: int = 32
) -> dict[str, float | int | None]:
    """How well the (unedited) model carries its *own* facts over to the paraphrases: the yardstick
    for ``rephrase_acc``, since an edit that made ``o*`` as well known as the model knows ``o``
    would score about the same.

    Over the requests with a ground truth ``o`` and paraphrases: ``prompt_acc`` and
    ``rephrase_acc`` are the token accuracies of ``o`` after ``p`` and after each ``p'``
    (averaged per request); ``known`` counts the requests whose prompt predicts every token of
    ``o`` (the model knows the fact) and ``known_rephrase_acc`` is ``rephrase_acc`` over those.
    """
    usable = [r for r in requests if r.ground_truth and r.rephrase_prompts]
    pairs = [(p, r.ground_truth) for r in usable for p in (r.prompt, *r.rephrase_prompts)]
    scored = iter(teacher_forced(model, tokenizer, pairs, batch_size))
    prompt_acc, rephrase_acc, known = [], [], []
    for r in usable:
        prompt_acc.append(next(scored).accuracy)
        rephrase_acc.append(_mean([next(scored).accuracy for _ in r.rephrase_prompts]))
        if prompt_acc[-1] == 1.0:
            known.append(rephrase_acc[-1])
    return {
        "requests": len(usable), "prompt_acc": _mean(prompt_acc), "rephrase_acc": _mean(rephrase_acc),
        "known": len(known), "known_rephrase_acc": _mean(known),
    }


@torch.no_grad()
def probe_agreement(
    model: nn.Module, tokenizer, facts: Sequence[tuple[str, str]], reference: Sequence[Tensor]
) -> float:
    """Agreement with the base model on unedited facts: mean over ``facts`` of the fraction of
    argmax tokens (teacher-forced on the answer) equal to the base model's ``reference``."""
    if len(facts) != len(reference):
        raise ValueError(f"{len(facts)} facts but {len(reference)} reference predictions")
    scored = teacher_forced(model, tokenizer, list(facts))
    return float(sum(float((s.predicted == r).float().mean()) for s, r in zip(scored, reference, strict=True))
                 / max(len(facts), 1))


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, text: str, window: int = 256) -> float:
    """``exp`` of the mean next-token NLL of ``text``, scored in non-overlapping windows of
    ``window`` tokens (each window predicts all but its first token)."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0].to(_device(model))
    if ids.numel() < 2:
        raise ValueError("perplexity needs a text of at least two tokens")
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window].unsqueeze(0)
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, chunk[0, 1:].to(logits.device), reduction="sum"))
        count += chunk.shape[1] - 1
    return math.exp(total / count)


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 30) -> str:
    """Greedy continuation of ``prompt`` (no sampling), decoded without special tokens."""
    ids = encode_prompt(tokenizer, prompt).unsqueeze(0).to(_device(model))
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id(tokenizer),
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Weighted mean over ``ns`` of the entropy (bits) of the n-gram frequency distribution of the
    words (and punctuation marks) of ``text``: ``mean_n(w_n * H_n)``. 0 for an empty text."""
    if len(ns) != len(weights):
        raise ValueError(f"ns and weights must have the same length, got {len(ns)} and {len(weights)}")
    words = _WORD.findall(text.lower())
    values = []
    for n, w in zip(ns, weights, strict=True):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * h)
    return float(sum(values) / len(values))


def fluency(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 30) -> tuple[float, list[str]]:
    """Mean :func:`ngram_entropy` of greedy generations from ``prompts``; returns it and the texts."""
    texts = [greedy_generate(model, tokenizer, p, max_new_tokens) for p in prompts]
    return (_mean([ngram_entropy(t) for t in texts]) or 0.0), texts


def weight_stability(weight: Tensor, base: Tensor, base_svals: Tensor | None = None) -> dict[str, float]:
    """Stability of an edited weight against its base (see the module docstring), in float64.

    Args:
        weight: the edited weight, any layout (singular values do not depend on it).
        base: the base weight, same layout.
        base_svals: precomputed singular values of ``base`` (descending), optional.
    """
    if weight.shape != base.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and base {tuple(base.shape)} differ in shape")
    w = weight.detach().double().cpu()
    b = base.detach().double().cpu()
    s = torch.linalg.svdvals(w)
    s0 = torch.linalg.svdvals(b) if base_svals is None else base_svals.double().cpu()
    return {
        "fro_norm": float(torch.linalg.vector_norm(w)),
        "cond": float(s[0] / s[-1]) if s[-1] > 0 else math.inf,
        "max_sv_rel_change": float(((s - s0).abs() / s0[0]).max()),
        "rel_change": float(torch.linalg.vector_norm(w - b) / torch.linalg.vector_norm(b)),
    }
