"""Pieces shared by the solvers: the result type, rotation hooks and the target loss."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mose_kernels.editing.adapters import EditTarget, capture_activations, rotate_activations, token_grid
from mose_kernels.editing.keep import KeepSubspace
from mose_kernels.editing.requests import EditRequest
from mose_kernels.editing.tokens import batch_prompt_targets, subject_token_span


class EditError(RuntimeError):
    """An edit could not be computed (non-finite values, no room left in the keep subspace)."""


@dataclass
class SolveResult:
    """Output of a solver: per target name, ``(k, n)`` float64 CPU Householder vectors."""

    vectors: dict[str, Tensor]
    steps: int
    final_loss: float
    success: bool
    extra: dict = field(default_factory=dict)


def model_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@dataclass(frozen=True)
class TargetBatch:
    """Prompt(s) + target tokens of one request, with the rows' subject-position masks."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    subject_mask: Tensor  # (B, L) bool

    def positions(self, which: str) -> Tensor | None:
        """The ``(B, L)`` mask of the tokens an edit acts on while solving (``EditConfig.edit_positions``;
        ``None``: all tokens)."""
        if which == "all":
            return None
        if which == "subject":
            return self.subject_mask
        if which == "subject_last":
            idx = torch.arange(self.subject_mask.shape[1], device=self.subject_mask.device)
            return idx == self.subject_last().unsqueeze(1)
        raise ValueError(f"unknown edit_positions {which!r}")

    def subject_last(self) -> Tensor:
        """``(B,)`` index of each row's last subject token."""
        idx = torch.arange(self.subject_mask.shape[1], device=self.subject_mask.device).expand_as(self.subject_mask)
        return torch.where(self.subject_mask, idx, torch.full_like(idx, -1)).max(dim=1).values

    @classmethod
    def build(cls, tokenizer, request: EditRequest, prefixes: Sequence[str], device) -> TargetBatch:
        prompts = [request.prompt] + [f"{p.strip()} {request.prompt}" for p in prefixes]
        ids, mask, labels = batch_prompt_targets(tokenizer, [(p, request.target_new) for p in prompts], device)
        subject = torch.zeros_like(mask, dtype=torch.bool)
        for i, p in enumerate(prompts):
            start, end = subject_token_span(tokenizer, p, request.subject)
            subject[i, start:end] = True
        return cls(ids, mask, labels, subject)


@dataclass(frozen=True)
class StepWindow:
    """The tokens an optimisation step runs the model on: ``[start, L - 1)`` of a :class:`TargetBatch`.

    When an edit acts on some positions only (``edit_positions="subject"``), the tokens before the
    first of them see neither the rotation nor, under causal attention, anything after them: their
    keys and values are computed once per solve (``cache``) instead of at every step. The last
    token predicts nothing that is scored, so it is not run either. Exact: the loss equals the
    full forward's up to float rounding.
    """

    start: int
    cache: Any | None
    cache_argument: str = "past_key_values"  # the name the model's body takes ``cache`` under

    @classmethod
    def build(cls, model: nn.Module, batch: TargetBatch, positions: Tensor | None) -> StepWindow:
        """The window of ``batch`` for an edit acting on ``positions`` (``None``: every token), with
        the cache computed on ``model`` as it is now (call it outside the rotation hooks)."""
        if positions is None or not bool(positions.any(dim=1).all()):
            return cls(0, None)
        start = int(positions.to(torch.int8).argmax(dim=1).min())
        if start == 0:
            return cls(0, None)
        body = _causal_body(model)
        try:
            with torch.no_grad():
                out = body(input_ids=batch.input_ids[:, :start], attention_mask=batch.attention_mask[:, :start],
                           use_cache=True)
        except (TypeError, ValueError):  # a model without a key/value cache runs every token
            return cls(0, None)
        argument = _cache_argument(body)
        cache = getattr(out, argument, None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        return cls(0, None) if cache is None else cls(start, cache, argument)

    def positions(self, mask: Tensor | None) -> Tensor | None:
        """``mask`` (``(B, L)``) restricted to the window's tokens, for :func:`rotation_hooks`."""
        return None if mask is None else mask[:, self.start : -1]


def _cache_argument(module: nn.Module) -> str:
    """Name of the key/value cache argument of ``module.forward``: ``cache`` (transformers >= 5.24)
    or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _causal_body(model: nn.Module) -> nn.Module:
    """The model without its LM head when it exposes both (cheaper: the head is applied to the
    target-predicting hidden states alone), else the model itself."""
    head, base = model.get_output_embeddings(), getattr(model, "base_model", None)
    plain = type(model).__name__.endswith("ForCausalLM") or type(model).__name__.endswith("LMHeadModel")
    return base if plain and isinstance(head, nn.Linear) and base is not None and base is not model else model


def _target_logits(model: nn.Module, batch: TargetBatch, valid: Tensor, window: StepWindow | None) -> Tensor:
    """Logits at the positions that predict target tokens only (``(N, vocab)``)."""
    body = _causal_body(model)
    if window is None:
        ids, mask, extra = batch.input_ids, batch.attention_mask, {}
    else:
        ids, mask = batch.input_ids[:, window.start : -1], batch.attention_mask[:, :-1]
        extra = {"use_cache": False} if window.cache is None else {
            window.cache_argument: copy.deepcopy(window.cache), "use_cache": True}
    if body is model:
        logits = model(input_ids=ids, attention_mask=mask, **extra).logits
        return logits[:, : valid.shape[1]][valid.to(logits.device)]
    hidden = body(input_ids=ids, attention_mask=mask, **extra)[0]
    logits = model.get_output_embeddings()(hidden[:, : valid.shape[1]][valid.to(hidden.device)])
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2 caps its logits
    return logits if not cap else torch.tanh(logits / cap) * cap


def target_nll(model: nn.Module, batch: TargetBatch, window: StepWindow | None = None) -> tuple[Tensor, bool, Tensor]:
    """Mean (over rows) of each row's mean target-token NLL; whether row 0's target tokens are
    all the argmax; and the log-probabilities at the target-predicting positions (``(N, vocab)``).
    ``window``: run only those tokens (:class:`StepWindow`); ``None``: the whole batch."""
    labels = batch.labels[:, 1 + (window.start if window is not None else 0):]
    valid = labels != -100
    logp = F.log_softmax(_target_logits(model, batch, valid, window).float(), dim=-1)
    labels, valid = labels.to(logp.device), valid.to(logp.device)  # the head's device under a device_map
    picked = logp.gather(-1, labels[valid].unsqueeze(-1)).squeeze(-1)
    rows = torch.nonzero(valid)[:, 0]
    counts = valid.sum(1).clamp_min(1).to(picked.dtype)
    per_row = -torch.zeros(valid.shape[0], dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)
    first = rows == 0
    hits = logp[first].argmax(-1) == labels[valid][first]
    return (per_row / counts).mean(), bool(hits.all()), logp


@contextmanager
def rotation_hooks(
    targets: Sequence[EditTarget],
    vectors: Callable[[str], Tensor],
    side: str,
    positions: Tensor | None = None,
    backend: str = "auto",
) -> Iterator[None]:
    """Apply each target's edit to its activations while the model runs (differentiable).

    ``vectors(name)`` returns the current ``(k, n)`` vectors; ``positions`` (``(B, L)`` bool)
    restricts the rotation to those tokens of a batch of that shape. Hooks are removed on exit.
    """
    handles = []

    def rotate(x: Tensor, name: str) -> Tensor:
        out = rotate_activations(x, vectors(name).to(x.dtype), side, backend=backend)
        grid = None if positions is None else token_grid(out, positions.shape, required=False)
        if grid is not None:  # (another batch, e.g. neighbour prompts, is rotated at every token)
            where = positions.to(out.device).unsqueeze(-1)  # the layer's device under a device_map
            out = torch.where(where, grid, token_grid(x, positions.shape)).reshape(x.shape)
        return out

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple):
            return (rotate(args[0], name), *args[1:])

        return hook

    def post_hook(name: str, bias: Tensor | None):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if bias is None:
                return rotate(output, name)
            return rotate(output - bias, name) + bias

        return hook

    try:
        for t in targets:
            if side == "input":
                handles.append(t.module.register_forward_pre_hook(pre_hook(t.name)))
            else:
                handles.append(t.module.register_forward_hook(post_hook(t.name, t.bias)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter, restoring the flags on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def finalize_vectors(raw: Mapping[str, Tensor], keep: Mapping, *, what: str) -> dict[str, Tensor]:
    """Project each target's vectors onto its keep subspace's complement in float64 (exact
    preservation) and check them: finite, non-zero."""
    out = {}
    for name, V in raw.items():
        v64 = V.detach().double().cpu()
        if not torch.isfinite(v64).all():
            raise EditError(f"{what}: non-finite Householder vectors for {name}")
        if name in keep:
            for _ in range(2):
                v64 = keep[name].project_out(v64)
        norms = torch.linalg.vector_norm(v64, dim=1)
        if (norms <= 1e-10 * max(float(norms.max()), 1e-300)).any() or float(norms.max()) == 0.0:
            raise EditError(f"{what}: a Householder vector of {name} vanished (no room outside the keep subspace)")
        out[name] = v64
    return out


def rotated_vectors(model, targets: Sequence[EditTarget], batch: TargetBatch, side: str) -> dict[str, Tensor]:
    """``(B, L, n)`` vectors each target's rotation acts on (inputs, or bias-free outputs), unedited
    model (run only as far as the last target)."""
    with torch.no_grad():
        io = capture_activations(model, targets, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    out = {}
    for t in targets:
        x, y = io[t.name]
        vec = x if side == "input" else (y - t.bias if t.bias is not None else y)
        out[t.name] = token_grid(vec, batch.input_ids.shape)
    return out


def keep_other_positions(targets: Sequence[EditTarget], batch: TargetBatch, vectors: Mapping[str, Tensor],
                          keep: Mapping[str, KeepSubspace], side: str, tol: float) -> dict[str, KeepSubspace]:
    """``keep`` grown (for this edit only, with no capacity limit) by ``vectors`` (see
    :func:`rotated_vectors`) at every position of ``batch`` except each row's last subject token."""
    rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
    others = batch.attention_mask.bool().clone()
    others[rows, batch.subject_last()] = False
    grown = dict(keep)
    for t in targets:
        vec = vectors[t.name]
        n = t.dim(side)
        base = keep[t.name] if t.name in keep else KeepSubspace.empty(n, capacity=1.0, tol=tol)
        grown[t.name] = replace(base, max_dim=n).add(vec[others.to(vec.device)])
    return grown
