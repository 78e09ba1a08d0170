"""Additive editing baselines, run by the same harness on the same layers and requests as MOSE.

- :class:`FineTuneEditor` (``"ft"``, FT-M style): Adam on the weights of the edited projections,
  loss = mean NLL of the target tokens with the prompt masked (the loss MOSE's gradient solver
  uses, :func:`mose_kernels.editing.solvers.common.target_nll`).
- :class:`RankOneEditor` (``"rome"``, ROME style): per request, key ``k*`` = the projection's input
  at the subject's last token, value ``v*`` = its output plus an offset optimised so the target
  becomes likely, then the closed-form rank-one update
  ``W <- W + (v* - W k*) (C^-1 k*)^T / (k*^T C^-1 k*)`` with ``C`` the (ridge-regularised) second
  moment of the projection's inputs over a corpus sampled from the model.
- :class:`NullSpaceEditor` (``"alphaedit"``, AlphaEdit style): the same key and value, but the
  update ``D = r k^T P (k k^T P + K_p K_p^T P + I)^-1`` (``r = v* - W k*``, ``K_p`` earlier edits'
  keys) vanishes on the corpus keys (``D k0 = 0`` when ``P k0 = 0``); ``P`` is the projector on the
  eigenvectors of ``C`` with eigenvalue below ``null_tol`` times the largest.

Every editor mutates the model in place, one request at a time, and returns
:class:`mose_kernels.editing.EditResult` s like :class:`mose_kernels.editing.MoseEditor`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mose_kernels.editing.adapters import EditTarget, capture_io, find_edit_targets, token_grid
from mose_kernels.editing.editor import EditResult
from mose_kernels.editing.requests import EditRequest
from mose_kernels.editing.solvers.common import TargetBatch, frozen, model_device, target_nll
from mose_kernels.editing.tokens import pad_id

logger = logging.getLogger(__name__)

BASELINES = ("ft", "rome", "alphaedit")


def maths_weight(target: EditTarget) -> Tensor:
    """The weight of ``target`` as ``(out, in)`` (a view: GPT-2 ``Conv1D`` stores it transposed)."""
    w = target.weight.data
    return w if target.weight_layout == "out_in" else w.T


def _as_request(request) -> EditRequest:
    return request if isinstance(request, EditRequest) else EditRequest.from_dict(request)


class FineTuneEditor:
    """FT-M style additive baseline: fine-tune the projection weights of ``layers`` on each request.

    Args:
        model, tokenizer: the model to edit in place and its tokenizer.
        layers: layer indices (the same as the MOSE editor's).
        steps: at most this many Adam steps per request (EasyEdit's FT-M uses 25).
        lr: Adam learning rate (EasyEdit's FT-M uses 5e-4).
        stop_loss: stop early once the mean target NLL is below this (nats).
        template: module template, as for :func:`find_edit_targets`.
    """

    name = "ft"

    def __init__(self, model: nn.Module, tokenizer, layers: Sequence[int], *, steps: int = 25, lr: float = 5e-4,
                 stop_loss: float = 1e-2, template: str | None = None) -> None:
        if steps < 1 or lr <= 0:
            raise ValueError(f"steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}")
        self.model, self.tokenizer = model, tokenizer
        self.targets = find_edit_targets(model, list(layers), template)
        self.steps, self.lr, self.stop_loss = steps, lr, stop_loss
        self._count = 0

    def edit(self, requests) -> list[EditResult]:
        """Edit the requests one after another (sequential editing)."""
        reqs = [_as_request(r) for r in (requests if isinstance(requests, list | tuple) else [requests])]
        return [self._edit_one(r) for r in reqs]

    def _edit_one(self, request: EditRequest) -> EditResult:
        start = time.perf_counter()
        batch = TargetBatch.build(self.tokenizer, request, (), model_device(self.model))
        weights = [t.weight for t in self.targets]
        loss_value, success, step = float("nan"), False, 0
        with frozen(self.model), torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            opt = torch.optim.Adam(weights, lr=self.lr)
            for step in range(self.steps + 1):
                loss, success, _ = target_nll(self.model, batch)
                loss_value = loss.item()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite fine-tuning loss for request {request.prompt!r}")
                if loss_value < self.stop_loss or step == self.steps:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for w in weights:
            w.grad = None
        self._count += 1
        return EditResult(self._count - 1, request, success, step, loss_value, time.perf_counter() - start,
                          [t.name for t in self.targets])


@torch.no_grad()
def sample_corpus(model: nn.Module, tokenizer, count: int = 64, length: int = 48, seed: int = 0) -> list[str]:
    """Texts sampled (top-k 50) from the model itself: key statistics that need no data files."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sampling from")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        ids = torch.full((count, 1), start, dtype=torch.long, device=model_device(model))
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=50,
                             max_new_tokens=length, min_new_tokens=length, pad_token_id=pad_id(tokenizer))
    finally:
        torch.random.set_rng_state(state)
    return tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)


@torch.no_grad()
def key_second_moment(model: nn.Module, tokenizer, target: EditTarget, texts: Sequence[str]) -> Tensor:
    """``E[k k^T]`` (float64, ``(in, in)``) of the inputs of ``target`` over every token of ``texts``."""
    total, count = None, 0
    device = model_device(model)
    with capture_io([target]) as io:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
            if ids.numel() == 0:
                continue
            model(input_ids=ids)
            keys = io[target.name].pop()[0].reshape(-1, target.in_features).double().cpu()
            total = keys.T @ keys if total is None else total + keys.T @ keys
            count += keys.shape[0]
    if total is None:
        raise ValueError("the key corpus produced no tokens")
    return total / count


class RankOneEditor:
    """ROME-style additive baseline: a closed-form rank-one update of one projection per request.

    Args:
        model, tokenizer: the model to edit in place and its tokenizer.
        layer: the layer whose projection is edited.
        value_steps, value_lr: Adam search of the value offset (ROME: 20 steps, lr 0.5).
        clamp_norm: the offset's norm is kept below ``clamp_norm * ||W k*||`` (ROME: 4).
        weight_decay: penalty ``weight_decay * ||offset||^2 / ||W k*||^2`` in the value search.
        ridge: ``C + ridge * tr(C) / n * I`` regularises the corpus second moment.
        corpus: texts for ``C`` (``None``: 64 texts sampled from the model, seed 0).
        template: module template, as for :func:`find_edit_targets`.
    """

    name = "rome"

    def __init__(self, model: nn.Module, tokenizer, layer: int, *, value_steps: int = 20, value_lr: float = 0.5,
                 clamp_norm: float = 4.0, weight_decay: float = 0.5, ridge: float = 1e-2,
                 corpus: Sequence[str] | None = None, template: str | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.targets = find_edit_targets(model, [layer], template)
        self.target = self.targets[0]
        self.value_steps, self.value_lr = value_steps, value_lr
        self.clamp_norm, self.weight_decay = clamp_norm, weight_decay
        texts = list(corpus) if corpus is not None else sample_corpus(model, tokenizer)
        moment = key_second_moment(model, tokenizer, self.target, texts)
        n = moment.shape[0]
        self._moment = moment
        self._c_inv = torch.linalg.inv(moment + ridge * moment.trace() / n * torch.eye(n, dtype=moment.dtype))
        self._count = 0

    def edit(self, requests) -> list[EditResult]:
        """Edit the requests one after another (sequential editing)."""
        reqs = [_as_request(r) for r in (requests if isinstance(requests, list | tuple) else [requests])]
        return [self._edit_one(r) for r in reqs]

    def key_value(self, request: EditRequest) -> tuple[Tensor, Tensor, TargetBatch, int, float, bool]:
        """``(k*, v*, batch, steps, loss, success)`` of a request on the current model (float64 CPU
        key and value; the model is left unchanged)."""
        t = self.target
        batch = TargetBatch.build(self.tokenizer, request, (), model_device(self.model))
        pos = int(batch.subject_last()[0])
        with capture_io([t]) as io:
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        x, y = (token_grid(a, batch.input_ids.shape) for a in io[t.name][0])
        key, base = x[0, pos].double().cpu(), y[0, pos].detach()
        delta = torch.zeros_like(base, dtype=torch.float32, requires_grad=True)
        scale = float(base.float().norm())

        def shift(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            out = out.clone(memory_format=torch.contiguous_format)
            grid = token_grid(out, batch.input_ids.shape)  # a view of out
            grid[0, pos] = grid[0, pos] + delta.to(out.dtype)
            return out

        opt = torch.optim.Adam([delta], lr=self.value_lr)
        loss_value, success, step = float("nan"), False, 0
        handle = t.module.register_forward_hook(shift)
        try:
            with frozen(self.model), torch.enable_grad():
                for step in range(self.value_steps + 1):
                    nll, success, _ = target_nll(self.model, batch)
                    loss_value = nll.item()
                    if not torch.isfinite(nll):
                        raise FloatingPointError(f"non-finite value-search loss for request {request.prompt!r}")
                    if loss_value < 5e-2 or step == self.value_steps:
                        break
                    loss = nll + self.weight_decay * delta.square().sum() / scale**2
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        limit = self.clamp_norm * scale
                        if float(delta.norm()) > limit:
                            delta.mul_(limit / float(delta.norm()))
        finally:
            handle.remove()
        bias = t.bias
        value = (base.float() + delta.detach() - (bias.float() if bias is not None else 0.0)).double().cpu()
        return key, value, batch, step, loss_value, success

    def _update(self, key: Tensor, value: Tensor) -> Tensor:
        """``(out, in)`` float64 additive update for one key and value (rank one)."""
        w = maths_weight(self.target).double().cpu()
        u = self._c_inv @ key
        return torch.outer(value - w @ key, u) / (u @ key)

    def _edit_one(self, request: EditRequest) -> EditResult:
        start = time.perf_counter()
        key, value, batch, steps, loss, _ = self.key_value(request)
        update = self._update(key, value)
        if not torch.isfinite(update).all():
            raise FloatingPointError(f"non-finite {self.name} update for request {request.prompt!r}")
        w = maths_weight(self.target)
        with torch.no_grad():
            w.add_(update.to(w.dtype).to(w.device))
            _, success, _ = target_nll(self.model, batch)
        self._count += 1
        return EditResult(self._count - 1, request, success, steps, loss, time.perf_counter() - start,
                          [self.target.name], {"update_norm": float(update.norm())})


class NullSpaceEditor(RankOneEditor):
    """AlphaEdit-style additive baseline: :class:`RankOneEditor`'s key and value, with the update
    projected onto the null space of the corpus keys and of every earlier edit's key.

    Args:
        null_tol: eigenvalues of ``C`` below ``null_tol * max eigenvalue`` span the null space.
        (others as for :class:`RankOneEditor`)
    """

    name = "alphaedit"

    def __init__(self, model: nn.Module, tokenizer, layer: int, *, null_tol: float = 1e-2, **kwargs) -> None:
        super().__init__(model, tokenizer, layer, **kwargs)
        evals, evecs = torch.linalg.eigh(self._moment)
        basis = evecs[:, evals < null_tol * evals.max()]
        self._projector = basis @ basis.T
        self._kept = torch.zeros(self._moment.shape[0], self._moment.shape[0], dtype=torch.float64)
        logger.info("%s: null space of dimension %d of %d", self.name, basis.shape[1], basis.shape[0])

    def _update(self, key: Tensor, value: Tensor) -> Tensor:
        w = maths_weight(self.target).double().cpu()
        P = self._projector
        residual = value - w @ key
        kkP = torch.outer(key, key) @ P
        system = kkP + self._kept @ P + torch.eye(P.shape[0], dtype=P.dtype)
        # D = r k^T P system^-1 (row vector solved through the transpose); D k0 = 0 whenever P k0 = 0.
        row = torch.linalg.solve(system.T, P @ key)
        self._kept += torch.outer(key, key)
        return torch.outer(residual, row)
