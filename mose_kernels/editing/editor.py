"""The MOSE editor: sequential multiplicative orthogonal edits of a Hugging Face causal LM.

Each edit multiplies the weight of an MLP output projection by an orthogonal factor, a product
of a few Householder reflections (input side ``W <- W Q^T`` or output side ``W <- Q W``), so the
singular values, norm and condition number of every edited weight never change. After the commit
the model is a plain ``transformers`` model (no wrapper modules, no inference overhead).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mose_kernels.editing.adapters import (
    EditTarget,
    capture_activations,
    find_edit_targets,
    rotate_weight_,
    token_grid,
)
from mose_kernels.editing.config import (
    MODEL_SAMPLES,
    EditConfig,
    neighbour_subjects,
    preset_for,
    shipped_keep_corpus,
)
from mose_kernels.editing.journal import EditJournal, JournalEntry
from mose_kernels.editing.keep import KeepSubspace
from mose_kernels.editing.key_bank import KeyBank
from mose_kernels.editing.requests import EditRequest
from mose_kernels.editing.solvers import gradient, procrustes
from mose_kernels.editing.solvers.common import EditError, SolveResult, model_device
from mose_kernels.editing.tokens import batch_prompts, encode_prompt_target, pad_id

logger = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)


@dataclass
class EditResult:
    """Outcome of one edit.

    Attributes:
        edit_id: the journal id (``-1`` if the edit was not committed).
        request: the request.
        success: every target token was the argmax when the solver stopped.
        steps: optimisation steps taken; ``final_loss``: mean target NLL at the end.
        seconds: wall time of solve + commit (a batch's time divided by its size).
        layers: names of the edited modules.
        extra: diagnostics (keep-subspace dimensions, the fraction of the edit's keys left
            outside the keep subspace, solver details).
    """

    edit_id: int
    request: EditRequest
    success: bool
    steps: int
    final_loss: float
    seconds: float
    layers: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def _resolve_config(model: nn.Module, config: EditConfig | Mapping[str, Any] | None) -> EditConfig:
    if isinstance(config, EditConfig):
        return config
    if config is None:
        return preset_for(model)
    if isinstance(config, Mapping):
        base = preset_for(model).to_dict()
        base.update(config)
        return EditConfig.from_dict(base)
    raise TypeError(f"config must be an EditConfig, a dict or None, got {type(config).__name__}")


def _requests_from_keywords(prompts, target_new, ground_truth, subject, rephrase_prompts, locality_inputs):
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)

    def listify(value, name):
        if value is None:
            return [None] * n
        value = [value] if isinstance(value, str) else list(value)
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return value

    targets, truths = listify(target_new, "target_new"), listify(ground_truth, "ground_truth")
    subjects, rephrases = listify(subject, "subject"), listify(rephrase_prompts, "rephrase_prompts")
    if any(t is None for t in targets) or any(s is None for s in subjects):
        raise ValueError("the keyword form needs target_new and subject for every prompt")
    loc_prompts, loc_answers = [()] * n, [()] * n
    for group in (locality_inputs or {}).values():
        ps, gs = listify(group.get("prompt"), "locality prompt"), listify(group.get("ground_truth"), "locality answer")
        loc_prompts = [(*a, p) if p else a for a, p in zip(loc_prompts, ps, strict=True)]
        gs = [g if isinstance(g, str) or not g else g[0] for g in gs]
        loc_answers = [(*a, g) if g else a for a, g in zip(loc_answers, gs, strict=True)]
    return [
        EditRequest(
            prompt=p, subject=s, target_new=t, ground_truth=g,
            rephrase_prompts=() if r is None else ((r,) if isinstance(r, str) else tuple(r)),
            locality_prompts=lp, locality_answers=la,
        )
        for p, s, t, g, r, lp, la in zip(
            prompts, subjects, targets, truths, rephrases, loc_prompts, loc_answers, strict=True
        )
    ]


def _as_requests(requests) -> list[EditRequest]:
    if isinstance(requests, (EditRequest, Mapping)):
        requests = [requests]
    out = []
    for r in requests:
        if isinstance(r, EditRequest):
            out.append(r)
        elif isinstance(r, Mapping):
            out.append(EditRequest.from_dict(r))
        else:
            raise TypeError(f"a request must be an EditRequest or a dict, got {type(r).__name__}")
    return out


class MoseEditor:
    """Sequential MOSE editing of one model.

    Args:
        model: a Hugging Face causal LM (any device placement, fp32 / bf16 / fp16).
        tokenizer: its tokenizer.
        config: an :class:`EditConfig`, a dict of overrides of the preset, or ``None`` (the preset
            for the model's architecture and size, see ``mose_kernels/editing/presets``).

    Example:
        >>> editor = MoseEditor(model, tokenizer)
        >>> editor.edit({"prompt": "The capital of France is", "subject": "France", "target_new": "Rome"})
        >>> editor.stability()          # norm / condition number unchanged
        >>> editor.undo()               # exact inverse of the last edit
    """

    def __init__(self, model: nn.Module, tokenizer, config: EditConfig | Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = _resolve_config(model, config)
        self.targets: list[EditTarget] = find_edit_targets(model, self.config.layers, self.config.template)
        self.journal = EditJournal(config=self.config.to_dict())
        self._masters: dict[str, Tensor] = {}
        self._base_svals: dict[str, Tensor] = {}
        self._keep: dict[str, KeepSubspace] | None = None
        self._corpus_acts: dict[str, Tensor] | None = None
        self._key_bank: KeyBank | None = None  # earlier edits' keys (edit_keys_weight)
        self._subject_pool: list[str] | None = None
        self.results: list[EditResult] = []

    # ------------------------------------------------------------------ weights
    def _work_weight(self, t: EditTarget) -> Tensor:
        """The tensor edits are applied to: the fp32 master of a half-precision weight, else the weight."""
        if t.name in self._masters:
            return self._masters[t.name]
        w = t.weight.data
        if w.dtype in _HALF and self.config.keep_fp32_master:
            self._masters[t.name] = w.float().clone()
            return self._masters[t.name]
        return w

    def _maths_weight(self, t: EditTarget) -> Tensor:
        w = self._masters.get(t.name, t.weight.data).float()
        return w if t.weight_layout == "out_in" else w.T

    def _sync(self, t: EditTarget) -> None:
        if t.name in self._masters:
            t.weight.data.copy_(self._masters[t.name])

    # ------------------------------------------------------------------ keep subspaces
    def _activations(self, batches: Sequence[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """Vectors the edits act on (inputs, or bias-free outputs) at every non-pad position, on the
        CPU in float32 (exact for fp32 / bf16 / fp16 models, half of float64's memory: a corpus of
        17k tokens at LLaMA-3-8B's width is 1 GB per layer), float64 for a float64 model."""
        out: dict[str, list[Tensor]] = {t.name: [] for t in self.targets}
        with torch.no_grad():
            for ids, mask in batches:
                io = capture_activations(self.model, self.targets, input_ids=ids, attention_mask=mask)
                valid = mask.bool()
                for t in self.targets:
                    x, y = io[t.name]
                    if self.config.side == "output":
                        x = y - t.bias if t.bias is not None else y
                    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
                    out[t.name].append(token_grid(x, valid.shape)[valid.to(x.device)].to(dtype).cpu())
        return {name: torch.cat(v) for name, v in out.items()}

    def _text_batches(self, texts: Sequence[str], size: int = 16, max_tokens: int = 64) -> list[tuple[Tensor, Tensor]]:
        """Batches of corpus texts, each cut to ``max_tokens`` (and to the model's context)."""
        device = model_device(self.model)
        config = self.model.config
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        limit = min(max_tokens, context) if context else max_tokens
        chunks = [list(texts[i : i + size]) for i in range(0, len(texts), size)]
        return [batch_prompts(self.tokenizer, chunk, device, max_tokens=limit)[:2] for chunk in chunks]

    def _sample_corpus(self, count: int = 32, length: int = 32) -> list[str]:
        """Texts sampled from the model itself (a corpus needing no data files)."""
        start = self.tokenizer.bos_token_id
        if start is None:
            start = self.tokenizer.eos_token_id
        if start is None:
            raise ValueError(f"keep_corpus is {MODEL_SAMPLES!r} and the tokenizer has no BOS/EOS to sample from; "
                             "pass keep_corpus as a list of texts")
        device = model_device(self.model)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(self.config.seed)
        try:
            ids = torch.full((count, 1), start, dtype=torch.long, device=device)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=length,
                                      min_new_tokens=length, top_k=50, pad_token_id=pad_id(self.tokenizer))
        finally:
            torch.random.set_rng_state(gen_state)
        return self.tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)

    def _init_keep(self) -> dict[str, KeepSubspace]:
        cfg = self.config
        keep = {}
        for t in self.targets:
            state = self.journal.keep_state.get(t.name)
            n = t.dim(cfg.side)
            keep[t.name] = (KeepSubspace.from_state(state, cfg.keep_room(n), cfg.keep_tol) if state
                            else KeepSubspace.empty(n, max_dim=cfg.keep_room(n), tol=cfg.keep_tol))
        # Corpus directions are installed once; a journal's stored subspaces already carry them
        # (re-installing would rebuild the edit directions). The corpus penalty needs the
        # activations in either case.
        wants_corpus = cfg.keep_corpus_dirs > 0 and not any(k.corpus.shape[1] for k in keep.values())
        if wants_corpus or (cfg.corpus_weight > 0 and self._corpus_acts is None):
            if cfg.keep_corpus is None:
                texts = shipped_keep_corpus()
            elif cfg.keep_corpus == MODEL_SAMPLES:
                texts = self._sample_corpus()
            else:
                texts = cfg.keep_corpus
            acts = self._activations(self._text_batches(list(texts)))
            gen = torch.Generator().manual_seed(cfg.seed)
            self._corpus_acts = {
                name: a[torch.randperm(a.shape[0], generator=gen)[:2048]].float() for name, a in acts.items()
            }
            if wants_corpus:
                keep = {name: k.with_corpus(acts[name], cfg.keep_corpus_dirs) for name, k in keep.items()}
                logger.info("keep subspaces: %d corpus directions per layer from %d texts",
                            cfg.keep_corpus_dirs, len(texts))
        return keep

    def _edit_keys(self, requests: Sequence[EditRequest]) -> dict[str, Tensor]:
        """The vectors ``requests`` wrote through (every position of prompt + target), per module."""
        device = model_device(self.model)
        batches = []
        for r in requests:
            ids = encode_prompt_target(self.tokenizer, r.prompt, r.target_new).input_ids.unsqueeze(0).to(device)
            batches.append((ids, torch.ones_like(ids)))
        return self._activations(batches)

    def _neighbour_prompts(self, request: EditRequest) -> list[str]:
        """``keep_neighbours`` copies of ``request.prompt`` with another subject (seeded by the prompt)."""
        if self._subject_pool is None:
            self._subject_pool = neighbour_subjects()
        pool = [s for s in self._subject_pool if s != request.subject]
        rng = random.Random(f"{self.config.seed}:{request.prompt}")
        chosen = rng.sample(pool, min(self.config.keep_neighbours, len(pool)))
        return [request.prompt.replace(request.subject, other, 1) for other in chosen]

    def _solver_keep(self, requests: Sequence[EditRequest]) -> dict[str, KeepSubspace]:
        """The keep subspaces one solve sees: the stored ones, plus (``keep_neighbours``) the
        vectors of the requests' prompts asked of other subjects, for this solve only."""
        if not self._uses_keep():
            return {}
        if not self.config.keep_neighbours:
            return self._keep
        prompts = [p for r in requests for p in self._neighbour_prompts(r)]
        acts = self._activations(self._text_batches(prompts))
        return {name: k.add(acts[name], compress=False) for name, k in self._keep.items()}

    # ------------------------------------------------------------------ editing
    def _commit(self, requests: Sequence[EditRequest], solved: SolveResult, start: float) -> list[EditResult]:
        """Multiply the solved factors (one rotation writing ``requests``) into the weights and
        journal them as one entry; all or nothing. ``start``: ``perf_counter`` when solving began."""
        cfg = self.config
        snapshot = {t.name: t.weight.data.clone() for t in self.targets if t.name in solved.vectors}
        masters = {name: m.clone() for name, m in self._masters.items()}
        keep_before, keep_state_before = self._keep, dict(self.journal.keep_state)
        bank_before = self._key_bank
        length_before = len(self.journal)
        extra = dict(solved.extra)
        try:
            vectors32 = {name: V.float() for name, V in solved.vectors.items()}
            for t in self.targets:
                if t.name not in vectors32:
                    continue
                if t.name not in self._base_svals:
                    self._base_svals[t.name] = torch.linalg.svdvals(self._maths_weight(t).double().cpu())
                rotate_weight_(self._work_weight(t), t.weight_layout, vectors32[t.name], cfg.side, backend=cfg.backend)
                self._sync(t)
                if not torch.isfinite(t.weight.data).all():
                    raise EditError(f"non-finite weight in {t.name} after the commit")
            entry = JournalEntry(
                edit_id=self.journal.next_id(), request=requests[0], batch=list(requests[1:]), side=cfg.side,
                vectors=vectors32,
                layouts={t.name: t.weight_layout for t in self.targets if t.name in vectors32},
                layers={t.name: t.layer for t in self.targets if t.name in vectors32},
                solver=cfg.solver, settings=cfg.to_dict(),
                metrics={"success": solved.success, "steps": solved.steps, "final_loss": solved.final_loss},
            )
            self.journal.entries.append(entry)
            if cfg.keep_edits or cfg.edit_keys_weight > 0:
                keys = self._edit_keys(requests)
            if cfg.edit_keys_weight > 0:
                self._key_bank = self._key_bank.added(keys)
            if cfg.keep_edits:
                extra["key_residual"] = {n: self._keep[n].residual_fraction(k) for n, k in keys.items()}
                grown = {n: k.add(keys[n]) for n, k in self._keep.items()}
                # The directions this edit added, when they are appended (no compression): undoing it
                # as the last edit then releases them.
                entry.metrics["keep_added"] = {
                    n: [keep_before[n].edits.shape[1], g.edits.shape[1]] for n, g in grown.items()
                    if torch.equal(g.edits[:, : keep_before[n].edits.shape[1]], keep_before[n].edits)
                }
                self._keep = grown
            extra["keep_dims"] = {n: k.dim for n, k in self._keep.items()}
            extra["keep_released"] = {n: k.released for n, k in self._keep.items()}
            self.journal.keep_state = {n: k.state_dict() for n, k in self._keep.items()}
        except BaseException:
            with torch.no_grad():
                for t in self.targets:
                    if t.name in snapshot:
                        t.weight.data.copy_(snapshot[t.name])
            self._masters = masters
            self._keep, self.journal.keep_state = keep_before, keep_state_before
            self._key_bank = bank_before
            del self.journal.entries[length_before:]
            raise
        seconds = time.perf_counter() - start
        entry.metrics["seconds"] = seconds
        return [EditResult(entry.edit_id, r, solved.success, solved.steps, solved.final_loss, seconds / len(requests),
                           list(vectors32), extra) for r in requests]

    def edit(self, requests=None, *, prompts=None, target_new=None, ground_truth=None, subject=None,
             rephrase_prompts=None, locality_inputs=None, sequential_edit: bool = True) -> list[EditResult]:
        """Write one or more facts into the model.

        Args:
            requests: an :class:`EditRequest`, a dict with EasyEdit's flat CounterFact keys, or a
                list of them. Alternatively EasyEdit's keyword form: ``prompts``, ``target_new``,
                ``ground_truth``, ``subject``, ``rephrase_prompts``, ``locality_inputs``
                (``{"neighborhood": {"prompt": [...], "ground_truth": [...]}}``).
            sequential_edit: ``True`` (default): each edit is solved on the model as edited by
                the previous ones and committed before the next. ``False``: a batch. The
                procrustes solver writes all requests with one closed-form rotation per layer
                (one journal entry, undone as a whole); the gradient solver solves each on the
                current model, then commits them one after another.

        Returns:
            One :class:`EditResult` per request. A failing edit (exception, NaN, interrupt)
            leaves the weights and the journal as they were before it and re-raises.
        """
        if requests is None:
            if prompts is None:
                raise ValueError("pass requests, or prompts= with target_new= and subject=")
            reqs = _requests_from_keywords(prompts, target_new, ground_truth, subject, rephrase_prompts,
                                           locality_inputs)
        else:
            if prompts is not None:
                raise ValueError("pass either requests or the keyword form (prompts=...), not both")
            reqs = _as_requests(requests)
        if self._keep is None:
            self._keep = self._init_keep()
        if self.config.edit_keys_weight > 0 and self._key_bank is None:
            # A loaded journal's edits: their keys on the model as it is now.
            self._key_bank = KeyBank.empty({t.name: t.dim(self.config.side) for t in self.targets}, self.config.seed)
            earlier = [r for e in self.journal for r in (e.request, *e.batch)]
            if earlier:
                self._key_bank = self._key_bank.added(self._edit_keys(earlier))
        results = []
        if sequential_edit:
            for r in reqs:
                start = time.perf_counter()
                solved = self._run_solver([r], self._solver_keep([r]))
                results.extend(self._commit([r], solved, start))
        elif self.config.solver == "procrustes":
            start = time.perf_counter()
            results = self._commit(reqs, self._run_solver(reqs, self._solver_keep(reqs)), start)
        else:
            solved_all = []
            for r in reqs:
                start = time.perf_counter()
                solved_all.append(([r], self._run_solver([r], self._solver_keep([r])), time.perf_counter() - start))
            for r, solved, solve_seconds in solved_all:
                results.extend(self._commit(r, solved, time.perf_counter() - solve_seconds))
        self.results.extend(results)
        return results

    def _uses_keep(self) -> bool:
        return self.config.keep_edits or self.config.keep_corpus_dirs > 0

    def _run_solver(self, requests: Sequence[EditRequest], keep: Mapping[str, KeepSubspace]) -> SolveResult:
        if self.config.solver == "gradient":
            (request,) = requests
            return gradient.solve(self.model, self.tokenizer, self.targets, request, keep, self.config,
                                  neighbour_prompts=self.config.neighbour_prompts, corpus=self._corpus_acts,
                                  edit_keys=self._key_bank.held() if self._key_bank is not None else None)
        return procrustes.solve_batch(self.model, self.tokenizer, self.targets, requests, keep, self.config,
                                      corpus=self._corpus_acts)

    # ------------------------------------------------------------------ undo and monitoring
    def undo(self, edit_id: int | None = None) -> None:
        """Remove an edit (the last one by default) exactly up to rounding (``Q^{-1} = Q^T``).

        Later edits of the same modules are unwound, the edit dropped and the later ones re-applied.
        Undoing the last edit also releases the keep-subspace directions it added (unless a later
        compression reordered them); an earlier edit's keys stay kept (conservative). All or
        nothing: on any failure the weights, the journal and the keep subspaces are as before."""
        if not self.journal.entries:
            raise ValueError("nothing to undo: the journal is empty")
        pos = len(self.journal) - 1 if edit_id is None else self.journal.index(edit_id)
        entry = self.journal.entries[pos]
        later = self.journal.entries[pos + 1 :]
        by_name = {t.name: t for t in self.targets}
        backend = self.config.backend
        snapshot = {name: by_name[name].weight.data.clone() for name in entry.vectors}
        masters = {name: m.clone() for name, m in self._masters.items()}
        keep_before, keep_state_before = self._keep, dict(self.journal.keep_state)
        try:
            release = not later and bool(entry.metrics.get("keep_added"))
            # the keys this edit added to the keep moments, read on the model as it left them
            release_keys = self._edit_keys(entry.requests) if release else None
            for name, V in entry.vectors.items():
                t = by_name[name]
                work = self._work_weight(t)
                touching = [e for e in later if name in e.vectors]
                for e in reversed(touching):
                    rotate_weight_(work, e.layouts[name], e.vectors[name], e.side, inverse=True, backend=backend)
                rotate_weight_(work, entry.layouts[name], V, entry.side, inverse=True, backend=backend)
                for e in touching:
                    rotate_weight_(work, e.layouts[name], e.vectors[name], e.side, backend=backend)
                self._sync(t)
            if release:
                self._release_keep(entry, release_keys)
            del self.journal.entries[pos]
        except BaseException:
            with torch.no_grad():
                for name, w in snapshot.items():
                    by_name[name].weight.data.copy_(w)
            self._masters = masters
            self._keep, self.journal.keep_state = keep_before, keep_state_before
            raise

    def _release_keep(self, entry: JournalEntry, keys: Mapping[str, Tensor]) -> None:
        """Drop the keep directions ``entry`` appended, where they are still the last ones, and
        its ``keys``' share of the compression moments."""
        if self._keep is None:
            self._keep = self._init_keep()
        keep = dict(self._keep)
        for name, (before, after) in entry.metrics.get("keep_added", {}).items():
            k = keep.get(name)
            if k is not None and k.edits.shape[1] == after:
                keep[name] = k.remove_last(after - before, keys[name])
        self._keep = keep
        self.journal.keep_state = {n: k.state_dict() for n, k in keep.items()}

    def stability(self) -> dict[str, dict[str, float]]:
        """Per edited module: ``fro_norm``, ``cond``, ``max_sv_rel_change`` (largest change of any
        singular value since the base model, relative to the largest one) and ``orth_error``
        (``max |P^T P - I|`` of 16 orthonormal probes pushed through the accumulated factors)."""
        report = {}
        for t in self.targets:
            if t.name not in self._base_svals:
                continue
            sv = torch.linalg.svdvals(self._maths_weight(t).double().cpu())
            base = self._base_svals[t.name]
            orth = 0.0
            for side in ("input", "output"):
                entries = [e for e in self.journal if t.name in e.vectors and e.side == side]
                if not entries:
                    continue
                n = t.dim(side)
                probe = torch.linalg.qr(torch.randn(n, min(16, n), dtype=torch.float64,
                                                    generator=torch.Generator().manual_seed(0)))[0].T.float()
                probe = probe.to(t.weight.device).contiguous()
                for e in entries:
                    rotate_weight_(probe, "out_in", e.vectors[t.name], "input", backend=self.config.backend)
                gram = probe.double() @ probe.double().T
                orth = max(orth, float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max()))
            report[t.name] = {
                "fro_norm": float(torch.linalg.vector_norm(sv)),
                "cond": float(sv[0] / sv[-1]) if sv[-1] > 0 else float("inf"),
                "max_sv_rel_change": float(((sv - base).abs() / base[0]).max()),
                "orth_error": orth,
            }
        return report


def edit(model: nn.Module, tokenizer, requests, **config) -> MoseEditor:
    """One-liner: build a :class:`MoseEditor` (preset settings overridden by ``config``), apply
    ``requests`` sequentially, and return the editor (``editor.results``, ``editor.journal``)."""
    editor = MoseEditor(model, tokenizer, config or None)
    editor.edit(requests)
    return editor
