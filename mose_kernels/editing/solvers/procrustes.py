"""Closed-form (orthogonal Procrustes) solver.

Per edited layer let ``a`` be the vector the rotation acts on at the subject's last token (the
projection's input on the input side, its bias-free output on the output side) and ``t`` a target
of the same norm, found ROME-style: a shared offset is optimised so that the target tokens become
likely, over the prompt and its context-prefixed copies. The offset moves only ``a``'s component
outside the keep subspace ``P``, at constant norm (``t = P a + |a_perp| (a_perp + d) / |a_perp + d|``,
``d`` orthogonal to ``P``), so a rotation that fixes ``P`` can reach ``t`` exactly. The rotation
``M`` (``M a`` replaces ``a``) maximises ``sum_i t_i . M a_i + lam * tr(M^T C)`` with ``C`` the
second moment of the same vectors over a sample corpus, restricted to ``U = orth(P_perp [a_i, t_i])``:
``M = I - U (I - M_s) U^T`` with ``M_s = polar(sum_i b_i a_i^T + lam U^T C U)`` (``r x r``). ``M_s``
is then factored into at most ``2 r`` reflections by Householder QR, embedded as ``v = U h``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mose_kernels.editing.adapters import EditTarget, token_grid
from mose_kernels.editing.config import EditConfig
from mose_kernels.editing.keep import KeepSubspace
from mose_kernels.editing.requests import EditRequest
from mose_kernels.editing.solvers.common import (
    EditError,
    SolveResult,
    TargetBatch,
    finalize_vectors,
    frozen,
    keep_other_positions,
    model_device,
    rotated_vectors,
    target_nll,
)

logger = logging.getLogger(__name__)


def polar(A: Tensor) -> Tensor:
    """Orthogonal polar factor ``U V^T`` of ``A = U S V^T`` (the closest orthogonal matrix)."""
    u, _, vh = torch.linalg.svd(A)
    return u @ vh


def reflections_of(M: Tensor) -> Tensor:
    """Householder vectors ``(k, r)`` with ``H_1 ... H_k = M`` for an orthogonal ``M`` (``r x r``).

    Householder QR gives ``M = H_1 ... H_m D`` with ``D = diag(+-1)``; each ``-1`` of ``D`` is one
    more reflection along a unit vector. Identity-like factors (``tau = 0``) are skipped.
    """
    r = M.shape[0]
    a, tau = torch.geqrf(M)
    rows = []
    for j in range(r):
        if tau[j].abs() <= 1e-14:
            continue
        v = torch.zeros(r, dtype=M.dtype)
        v[j] = 1.0
        v[j + 1 :] = a[j + 1 :, j]
        rows.append(v)
    for j in torch.nonzero(torch.diagonal(a) < 0).flatten().tolist():
        e = torch.zeros(r, dtype=M.dtype)
        e[j] = 1.0
        rows.append(e)
    return torch.stack(rows) if rows else M.new_zeros(0, r)


def _search_targets(model, targets, batch, config, keep: Mapping[str, KeepSubspace],
                    vectors: Mapping[str, Tensor] | None = None
                    ) -> tuple[dict[str, Tensor], dict[str, Tensor], int, float, bool]:
    """ROME-style target search: per layer, a shared offset at the subject's last token, moving only
    the vector's component outside the layer's keep subspace (at constant norm). ``vectors``:
    :func:`rotated_vectors` of ``batch`` if already computed."""
    side = config.side
    rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
    pos = batch.subject_last()
    if vectors is None:
        vectors = rotated_vectors(model, targets, batch, side)
    base = {t.name: vectors[t.name][rows.to(vectors[t.name].device), pos.to(vectors[t.name].device)].float()
            for t in targets}
    deltas = {t.name: torch.zeros(t.dim(side), device=t.weight.device, requires_grad=True) for t in targets}
    bases = {}
    for t in targets:
        basis = keep[t.name].basis if t.name in keep else None
        bases[t.name] = None if basis is None or basis.shape[1] == 0 else basis.float().to(t.weight.device)

    def outside(name: str, x: Tensor) -> Tensor:
        B = bases[name]
        return x if B is None else x - (x @ B.to(x.dtype)) @ B.T.to(x.dtype)

    def moved(name: str, a: Tensor, delta: Tensor) -> Tensor:
        free = outside(name, a)
        scale = free.norm(dim=-1, keepdim=True)
        turned = free + outside(name, delta.to(a.dtype)) * a.norm(dim=-1, keepdim=True) / a.shape[-1] ** 0.5
        return a - free + turned * scale / turned.norm(dim=-1, keepdim=True).clamp_min(1e-30)

    def shift(name: str, vec: Tensor) -> Tensor:
        out = vec.clone(memory_format=torch.contiguous_format)
        grid = token_grid(out, batch.input_ids.shape)  # a view of out
        at = (rows.to(grid.device), pos.to(grid.device))  # the layer's device under a device_map
        grid[at] = moved(name, grid[at], deltas[name])
        return out

    handles = []
    for t in targets:
        if side == "input":
            handles.append(t.module.register_forward_pre_hook(
                lambda m, args, name=t.name: (shift(name, args[0]), *args[1:])))
        else:
            def post(m, args, out, name=t.name, bias=t.bias):
                return shift(name, out) if bias is None else shift(name, out - bias) + bias
            handles.append(t.module.register_forward_hook(post))
    opt = torch.optim.Adam(deltas.values(), lr=config.value_lr / max(1, config.value_steps) ** 0.5)
    loss_value, success, step = float("nan"), False, 0
    try:
        with frozen(model), torch.enable_grad():
            for step in range(config.value_steps + 1):
                loss, success, _ = target_nll(model, batch)
                loss_value = float(loss.detach())
                if not torch.isfinite(loss):
                    raise EditError("non-finite loss in the procrustes target search")
                if (success and loss_value < config.stop_loss) or step == config.value_steps:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        goal = {t.name: moved(t.name, base[t.name], deltas[t.name].detach()) for t in targets}
    return base, goal, step, loss_value, success


def rotation_vectors(
    a: Tensor, b: Tensor, keep: KeepSubspace | None, corpus: Tensor | None, lam: float, side: str
) -> Tensor:
    """Householder vectors ``(k, n)`` of the rotation taking the rows of ``a`` towards those of ``b``
    while fixing the keep subspace and (weight ``lam``) the corpus vectors."""
    a64, b64 = a.double().cpu(), b.double().cpu()
    span = torch.cat([a64, b64])
    scale = torch.linalg.matrix_norm(span, ord=2).clamp_min(1e-300)
    if keep is not None:
        span = keep.project_out(keep.project_out(span))
    u, s, _ = torch.linalg.svd(span.T, full_matrices=False)
    U = u[:, s > 1e-8 * scale]
    if U.shape[1] == 0:
        raise EditError("the edit's vectors lie inside the keep subspace: no room to edit")
    A = (U.T @ b64.T) @ (U.T @ a64.T).T  # sum_i b_i a_i^T in the subspace
    if corpus is not None and lam > 0:
        xu = corpus.double().cpu() @ U
        A = A + lam * a64.shape[0] * (xu.T @ xu) / corpus.shape[0]
    M = polar(A)  # M a ~ b
    Q = M.T if side == "input" else M  # input side: Q^T a = M a; output side: Q a = M a
    return reflections_of(Q) @ U.T


def solve(
    model,
    tokenizer,
    targets: Sequence[EditTarget],
    request: EditRequest,
    keep: Mapping[str, KeepSubspace],
    config: EditConfig,
    corpus: Mapping[str, Tensor] | None = None,
) -> SolveResult:
    """Closed-form edit of one request (the model is left unchanged)."""
    return solve_batch(model, tokenizer, targets, [request], keep, config, corpus)


def solve_batch(
    model,
    tokenizer,
    targets: Sequence[EditTarget],
    requests: Sequence[EditRequest],
    keep: Mapping[str, KeepSubspace],
    config: EditConfig,
    corpus: Mapping[str, Tensor] | None = None,
) -> SolveResult:
    """One closed-form rotation per layer writing all ``requests`` together (the model is left
    unchanged): each request's target is searched on its own, then one polar factor takes every
    request's vectors towards their targets at once (``sum_i b_i a_i^T`` over all of them)."""
    if not requests:
        raise ValueError("solve_batch needs at least one request")
    device = model_device(model)
    batches = [TargetBatch.build(tokenizer, r, config.context_prefixes, device) for r in requests]
    acts = [rotated_vectors(model, targets, b, config.side) for b in batches]
    if config.isolate_subject:  # every request's other positions are kept off by the joint rotation
        for b, a in zip(batches, acts, strict=True):
            keep = keep_other_positions(targets, b, a, keep, config.side, config.keep_tol)
    bases: dict[str, list[Tensor]] = {t.name: [] for t in targets}
    goals: dict[str, list[Tensor]] = {t.name: [] for t in targets}
    steps, losses, success = 0, [], True
    for b, a in zip(batches, acts, strict=True):
        base, goal, step, loss, ok = _search_targets(model, targets, b, config, keep, a)
        steps, success = steps + step, success and ok
        losses.append(loss)
        for t in targets:
            bases[t.name].append(base[t.name])
            goals[t.name].append(goal[t.name])
    raw = {}
    for t in targets:
        V = rotation_vectors(torch.cat(bases[t.name]), torch.cat(goals[t.name]), keep.get(t.name),
                             None if corpus is None else corpus.get(t.name), config.procrustes_lambda, config.side)
        if V.shape[0]:  # an identity rotation (target equals the current vector) leaves the layer alone
            raw[t.name] = V
    if not raw:
        raise EditError("procrustes solver found no rotation for any layer (targets equal the current vectors)")
    vectors = finalize_vectors(raw, keep, what="procrustes solver")
    loss = sum(losses) / len(losses)
    logger.debug("procrustes solve of %d requests: %d search steps, mean loss %.4f", len(requests), steps, loss)
    return SolveResult(vectors, steps, loss, success,
                       {"reflections": {n: v.shape[0] for n, v in vectors.items()}, "batch_size": len(requests)})
