"""Gradient solver: ``k`` fresh Householder reflections per edit and layer, learned with Adam or
normalised gradient descent with momentum (``EditConfig.optimizer``).

The rotation acts on the activations during optimisation (input side: ``y = W (Q^T x)``, i.e.
``x Q`` on token rows) through ``householder_apply``'s autograd, so no ``n x n`` matrix is ever
formed. The vectors start as equal pairs (``H(u) H(u) = I``, the edit starts at the identity) and
live in the orthogonal complement of the keep subspace: the projection is part of the forward,
so gradients are projected too. Loss: mean NLL of the target tokens (prompt masked), optionally
averaged over context prefixes, plus an optional KL term on neighbourhood prompts. Each step runs
only the tokens the edit can change (:class:`StepWindow`: the prefix before the subject is cached).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from mose_kernels.editing.adapters import EditTarget
from mose_kernels.editing.config import EditConfig
from mose_kernels.editing.keep import KeepSubspace
from mose_kernels.editing.requests import EditRequest
from mose_kernels.editing.solvers.common import (
    EditError,
    SolveResult,
    StepWindow,
    TargetBatch,
    finalize_vectors,
    frozen,
    keep_other_positions,
    model_device,
    rotated_vectors,
    rotation_hooks,
    target_nll,
)
from mose_kernels.editing.solvers.penalty import HeldOutputs
from mose_kernels.editing.tokens import batch_prompts

logger = logging.getLogger(__name__)


class NormalizedMomentum(torch.optim.Optimizer):
    """Normalised gradient descent with heavy-ball momentum: per parameter, the buffer
    ``b <- momentum b + |p| g / |g|`` and the step ``p <- p - lr b``. The step follows the
    gradient's direction at a size relative to the parameter (Householder vectors act through
    their direction only), where Adam's early steps are the gradient's signs, spread evenly over
    every coordinate."""

    def __init__(self, params, lr: float, momentum: float = 0.8) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                direction = p.grad * (p.norm() / p.grad.norm().clamp_min(1e-30))
                state = self.state[p]
                if "buffer" not in state:
                    state["buffer"] = direction.clone()
                else:
                    state["buffer"].mul_(group["momentum"]).add_(direction)
                p.sub_(state["buffer"], alpha=group["lr"])


def last_logits(model, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Float logits at each row's ``last`` position (indices moved to the head's device)."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    rows = torch.arange(ids.shape[0], device=logits.device)
    return logits[rows, last.to(logits.device)].float()


def solve(
    model,
    tokenizer,
    targets: Sequence[EditTarget],
    request: EditRequest,
    keep: Mapping[str, KeepSubspace],
    config: EditConfig,
    neighbour_prompts: Sequence[str] = (),
    corpus: Mapping[str, torch.Tensor] | None = None,
    edit_keys: Mapping[str, HeldOutputs] | None = None,
) -> SolveResult:
    """Learn one edit's reflections; the model is left unchanged (hooks only). ``corpus`` (rows,
    the first 512 used) and ``edit_keys``: per layer, the vectors whose outputs the
    ``corpus_weight`` and ``edit_keys_weight`` penalties hold."""
    k = config.num_reflections
    if k % 2:
        raise ValueError(f"the gradient solver needs an even num_reflections (pairs), got {k}")
    device = model_device(model)
    batch = TargetBatch.build(tokenizer, request, config.context_prefixes, device)
    if config.isolate_subject:  # the committed rotation then acts, within the prompt, as it did while solving
        keep = keep_other_positions(targets, batch, rotated_vectors(model, targets, batch, config.side), keep,
                                    config.side, config.keep_tol)
    gen = torch.Generator().manual_seed(config.seed)
    params, bases = {}, {}
    for t in targets:
        n = t.dim(config.side)
        u = torch.randn(k // 2, n, generator=gen, dtype=torch.float64)
        if t.name in keep:
            u = keep[t.name].project_out(keep[t.name].project_out(u))
        params[t.name] = u.repeat_interleave(2, dim=0).float().to(t.weight.device).requires_grad_()
        basis = keep[t.name].basis if t.name in keep else None
        bases[t.name] = None if basis is None or basis.shape[1] == 0 else basis.float().to(t.weight.device)

    def effective(name: str) -> torch.Tensor:
        V, B = params[name], bases[name]
        return V if B is None else V - (V @ B) @ B.T

    weights: dict[str, torch.Tensor] = {}  # fp32 maths weights, built only for a penalty
    penalties = []  # (weight, per-layer held vectors, per-layer output energy of those vectors)
    corpus_held = {name: HeldOutputs(rows=x[:512]) for name, x in (corpus or {}).items()}
    # While a layer's keep subspace holds every earlier key (nothing released yet), the edit's
    # vectors are orthogonal to them and their penalty is zero up to rounding: skipped.
    released = {t.name: not config.keep_edits or t.name not in keep or keep[t.name].released > 0 for t in targets}
    sources = ((config.corpus_weight, corpus_held, [t.name for t in targets]),
               (config.edit_keys_weight, edit_keys or {}, [t.name for t in targets if released[t.name]]))
    for weight, source, names in sources:
        if weight > 0 and names and all(t.name in source and not source[t.name].empty for t in targets):
            if not weights:
                weights = {t.name: (t.weight if t.weight_layout == "out_in" else t.weight.T).detach().float()
                           for t in targets}
            held = {t.name: source[t.name].to(t.weight.device) for t in targets if t.name in names}
            energy = {name: h.energy(weights[name], config.side) for name, h in held.items()}
            penalties.append((weight, held, energy))

    def relative_change(held: Mapping[str, HeldOutputs], energy: Mapping[str, float]) -> torch.Tensor:
        """The edit's relative change of the held vectors' outputs (squared), summed over the held
        layers and divided by the number of edited layers."""
        device = targets[-1].weight.device  # summed on one device: layers may sit on several
        total = sum((held[t.name].change(effective(t.name), weights[t.name], config.side)
                     / max(energy[t.name], 1e-30)).to(device) for t in targets if t.name in held)
        return total / len(targets)

    positions = batch.positions(config.edit_positions)
    use_kl = config.kl_weight > 0 and len(neighbour_prompts) > 0
    if config.optimizer == "ngd":
        opt = NormalizedMomentum(params.values(), lr=config.lr)
    else:
        opt = torch.optim.Adam(params.values(), lr=config.lr)
    loss_value, success, step = float("nan"), False, 0
    with frozen(model), torch.enable_grad():
        if use_kl:
            n_ids, n_mask, n_last = batch_prompts(tokenizer, list(neighbour_prompts), device)
            with torch.no_grad():
                base_logp = F.log_softmax(last_logits(model, n_ids, n_mask, n_last), -1)
        window = StepWindow.build(model, batch, positions)  # before the hooks: the unedited prefix
        with rotation_hooks(targets, effective, config.side, window.positions(positions), config.backend):
            for step in range(config.steps + 1):
                loss, success, _ = target_nll(model, batch, window)
                loss_value = float(loss.detach())
                if not torch.isfinite(loss):
                    raise EditError(f"non-finite loss at step {step} for request {request.case_id or request.prompt!r}")
                if (success and loss_value < config.stop_loss) or step == config.steps:
                    break
                total = loss
                if use_kl:
                    logits = last_logits(model, n_ids, n_mask, n_last)
                    kl = F.kl_div(F.log_softmax(logits, -1), base_logp, log_target=True, reduction="batchmean")
                    total = total + config.kl_weight * kl
                for weight, held, energy in penalties:
                    total = total + weight * relative_change(held, energy).to(total.device)
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
    vectors = finalize_vectors(params, keep, what="gradient solver")
    logger.debug("gradient solve: %d steps, loss %.4f, success %s", step, loss_value, success)
    return SolveResult(vectors, step, loss_value, success)
