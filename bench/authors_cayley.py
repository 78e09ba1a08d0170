"""The MOSE authors' released editing approach, re-implemented for the throughput comparison.

What their code (an EasyEdit fork, ``easyeditor/models/oft``, hparams ``hparams/OFT/*.yaml``) does,
and what this module reproduces (MOSE_NOTES.md section 1):

- the MLP output projection of each edited layer is wrapped; its *input* side is rotated:
  ``W_eff = W Q^T`` with ``Q = blockdiag(Q_1, ..., Q_4)`` (4 blocks of ``n/4``), each block a Cayley
  transform ``Q_b = (I - S_b)(I + S_b)^{-1}`` of ``S_b = (R_b - R_b^T) / 2``;
- ``R`` starts at zero (``Q = I``); before every forward pass ``R`` is projected (no gradient) onto a
  Frobenius ball of radius ``1e-5 * b^2 / sqrt(4)`` around zero (their "COFT" constraint);
- ``Q`` is rebuilt densely and multiplied into ``W`` on **every** forward pass (training and
  inference alike): a ``b x b`` inverse per block and an ``n x n`` by ``n x d`` product;
- Adam (lr 5e-4, no weight decay) on ``R`` only, 25 steps, batch of one request, no early stop;
  the loss is the mean NLL of the target tokens after the prompt (prompt tokens masked);
- ``R`` persists: the next edit continues training the same rotation.

Differences, all deliberate: the prompt/target join goes through
:func:`mose_kernels.editing.tokens.encode_prompt_target` (the authors write ``f"{prompt} {target}"``,
the same text for targets without a leading space), and ``W_eff`` is cast to the activations' dtype
so half-precision models run (their code assumes float32).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mose_kernels.editing import EditRequest, encode_prompt_target, find_edit_targets

NUM_BLOCKS = 4
LR = 5e-4
STEPS = 25
COFT_EPS = 1e-5


class CayleyBlockLinear(nn.Module):
    """``y = x (W Q^T)^T + b`` with ``Q`` block-diagonal Cayley, rebuilt densely on each call."""

    def __init__(self, base: nn.Module, weight_layout: str, num_blocks: int = NUM_BLOCKS, eps: float = COFT_EPS):
        super().__init__()
        if weight_layout not in ("out_in", "in_out"):
            raise ValueError(f"weight_layout must be 'out_in' or 'in_out', got {weight_layout!r}")
        self.base = base
        self.weight_layout = weight_layout
        in_features = base.weight.shape[1] if weight_layout == "out_in" else base.weight.shape[0]
        if in_features % num_blocks:
            raise ValueError(f"in_features {in_features} is not divisible by num_blocks {num_blocks}")
        block = in_features // num_blocks
        self.R = nn.Parameter(torch.zeros(num_blocks, block, block, device=base.weight.device))
        self.radius = eps * block * block / num_blocks**0.5

    def rotation_blocks(self) -> Tensor:
        """Project R onto its ball (in place, as the authors do), then the Cayley blocks."""
        with torch.no_grad():
            norms = torch.linalg.matrix_norm(self.R, keepdim=True)
            self.R.copy_(torch.where(norms <= self.radius, self.R, self.radius * self.R / norms))
        skew = 0.5 * (self.R - self.R.transpose(1, 2))
        eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).expand_as(skew)
        return torch.bmm(eye - skew, torch.inverse(eye + skew))

    def effective_weight(self) -> Tensor:
        """``W Q^T`` as an ``nn.Linear`` weight (out, in)."""
        Q = torch.block_diag(*self.rotation_blocks())
        W = self.base.weight if self.weight_layout == "out_in" else self.base.weight.t()
        return (Q @ W.t().to(Q.dtype)).t()

    def forward(self, x: Tensor) -> Tensor:
        W = self.effective_weight().to(x.dtype)
        return nn.functional.linear(x, W, self.base.bias)


@dataclass
class AuthorsEditResult:
    seconds: float
    final_loss: float
    steps: int


class AuthorsCayleyEditor:
    """Sequential editor with the authors' approach on the given layers of ``model`` (modified in
    place: the projections are wrapped by :class:`CayleyBlockLinear`; :meth:`remove` unwraps them)."""

    def __init__(self, model: nn.Module, tokenizer, layers: Sequence[int], *, steps: int = STEPS, lr: float = LR):
        self.model, self.tokenizer, self.steps, self.lr = model, tokenizer, steps, lr
        self._wrapped: list[tuple[nn.Module, str, nn.Module]] = []
        for target in find_edit_targets(model, list(layers)):
            parent_name, _, child = target.name.rpartition(".")
            parent = model.get_submodule(parent_name)
            wrapper = CayleyBlockLinear(target.module, target.weight_layout)
            setattr(parent, child, wrapper)
            self._wrapped.append((parent, child, target.module))
        self.params = [p for parent, child, _ in self._wrapped for p in [getattr(parent, child).R]]

    def remove(self) -> None:
        """Put the original projections back (the edits are discarded)."""
        for parent, child, original in self._wrapped:
            setattr(parent, child, original)
        self._wrapped.clear()

    def edit(self, request: EditRequest) -> AuthorsEditResult:
        """Train the persistent rotations on one request: Adam, ``steps`` steps, no early stop."""
        device = next(self.model.parameters()).device
        pt = encode_prompt_target(self.tokenizer, request.prompt, request.target_new)
        input_ids = pt.input_ids.unsqueeze(0).to(device)
        labels = input_ids.clone()
        labels[:, : pt.prompt_length] = -100
        frozen = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(self.params, lr=self.lr, weight_decay=0.0)
        start = time.perf_counter()
        loss = torch.tensor(float("nan"))
        try:
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                loss = self.model(input_ids=input_ids, labels=labels).loss
                loss.backward()
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
        return AuthorsEditResult(seconds=time.perf_counter() - start, final_loss=float(loss.detach()), steps=self.steps)
