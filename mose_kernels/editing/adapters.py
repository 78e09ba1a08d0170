"""Model adapters: the one place that knows each architecture's MLP output projection.

An edit rotates the weight ``W`` (maths layout ``(out, in)``, ``y = W x + b``) of an MLP output
projection: on the *input* side ``W <- W Q^T`` (``y = W (Q^T x)``) or the *output* side
``W <- Q W``. ``nn.Linear`` stores ``W`` as ``(out, in)`` (layout ``"out_in"``); GPT-2's ``Conv1D``
stores ``W^T`` as ``(in, out)`` (layout ``"in_out"``). :func:`rotate_weight_` and
:func:`rotate_activations` translate an edit into the right kernel call for either layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mose_kernels.functional import householder_apply, householder_apply_

# model_type -> module template of the MLP output projection (``{}`` is the layer index).
TEMPLATES: dict[str, str] = {
    "llama": "model.layers.{}.mlp.down_proj",
    "qwen2": "model.layers.{}.mlp.down_proj",
    "qwen3": "model.layers.{}.mlp.down_proj",
    "mistral": "model.layers.{}.mlp.down_proj",
    "gemma": "model.layers.{}.mlp.down_proj",
    "gemma2": "model.layers.{}.mlp.down_proj",
    "phi3": "model.layers.{}.mlp.down_proj",
    "gpt2": "transformer.h.{}.mlp.c_proj",
    "gptj": "transformer.h.{}.mlp.fc_out",
    "gpt_neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h",
    "opt": "model.decoder.layers.{}.fc2",
}
# Probed in order when the model type is unknown (e.g. a bare base model without its LM head).
_PROBE_TEMPLATES = (
    *dict.fromkeys(TEMPLATES.values()),
    "layers.{}.mlp.down_proj",
    "h.{}.mlp.c_proj",
    "h.{}.mlp.fc_out",
    "layers.{}.mlp.dense_4h_to_h",
    "decoder.layers.{}.fc2",
)
EDIT_SIDES = ("input", "output")


@dataclass(frozen=True)
class EditTarget:
    """One editable projection.

    Attributes:
        name: module path, e.g. ``"model.layers.17.mlp.down_proj"``.
        layer: its layer index.
        module: the module (``nn.Linear`` or GPT-2 ``Conv1D``).
        weight_layout: ``"out_in"`` (``nn.Linear``) or ``"in_out"`` (``Conv1D``).
        in_features: size of the projection's input (the key dimension).
        out_features: size of its output (the value dimension, ``d_model``).
    """

    name: str
    layer: int
    module: nn.Module
    weight_layout: str
    in_features: int
    out_features: int

    @property
    def weight(self) -> Tensor:
        """The module's weight parameter, in its storage layout."""
        return self.module.weight

    @property
    def bias(self) -> Tensor | None:
        """The module's bias (``(out_features,)``) or ``None``."""
        return getattr(self.module, "bias", None)

    def dim(self, side: str) -> int:
        """Size ``n`` of the Householder vectors for an edit on ``side``."""
        _check_side(side)
        return self.in_features if side == "input" else self.out_features


def _check_side(side: str) -> None:
    if side not in EDIT_SIDES:
        raise ValueError(f"edit side must be one of {EDIT_SIDES}, got {side!r}")


def _layout(module: nn.Module, name: str) -> tuple[str, int, int]:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError(f"module {name!r} ({type(module).__name__}) has no 2-D weight to edit")
    if isinstance(module, nn.Linear):
        return "out_in", module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "in_out", weight.shape[0], weight.shape[1]
    raise TypeError(
        f"module {name!r} is a {type(module).__name__}; expected nn.Linear (weight (out, in)) or "
        "GPT-2 Conv1D (weight (in, out))"
    )


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def resolve_template(model: nn.Module, template: str | None = None) -> str:
    """The module template of ``model``'s MLP output projection (``template`` if given)."""
    if template is not None:
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}' for the layer index, got {template!r}")
        if _get(model, template.format(0)) is None:
            raise ValueError(f"template {template!r} names no module of {type(model).__name__} for layer 0")
        return template
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = TEMPLATES.get(model_type)
    if known is not None and _get(model, known.format(0)) is not None:
        return known
    for candidate in _PROBE_TEMPLATES:
        if _get(model, candidate.format(0)) is not None:
            return candidate
    raise ValueError(
        f"unknown architecture {type(model).__name__} (model_type={model_type!r}): no MLP output "
        f"projection found; known model types {sorted(TEMPLATES)}; pass template=, e.g. "
        "'model.layers.{}.mlp.down_proj'"
    )


def num_layers(model: nn.Module, template: str | None = None) -> int:
    """Number of transformer blocks (from the config, else by probing the template)."""
    config = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    tmpl = resolve_template(model, template)
    count = 0
    while _get(model, tmpl.format(count)) is not None:
        count += 1
    return count


def find_edit_targets(
    model: nn.Module, layers: Sequence[int], template: str | None = None
) -> list[EditTarget]:
    """The MLP output projections of ``layers`` (negative indices count from the end).

    Knows LLaMA, Qwen2, Mistral, Gemma, SmolLM (``mlp.down_proj``), GPT-2 (``mlp.c_proj``),
    GPT-J (``mlp.fc_out``), GPT-NeoX (``mlp.dense_4h_to_h``) and OPT (``fc2``); ``template``
    (e.g. ``"model.layers.{}.mlp.down_proj"``) overrides the lookup.

    Raises:
        ValueError: unknown architecture, empty, repeated or out-of-range layers, or an offloaded
            (meta-device) weight.
    """
    if isinstance(layers, int):
        layers = [layers]
    if not layers:
        raise ValueError("layers must name at least one layer")
    tmpl = resolve_template(model, template)
    total = num_layers(model, tmpl)
    targets, seen = [], set()
    for layer in layers:
        if not isinstance(layer, int):
            raise TypeError(f"layers must be ints, got {layer!r}")
        index = layer + total if layer < 0 else layer
        if not 0 <= index < total:
            raise ValueError(f"layer {layer} is out of range for a model with {total} layers")
        if index in seen:
            raise ValueError(f"layer {layer} is listed twice in {list(layers)}")
        seen.add(index)
        name = tmpl.format(index)
        module = _get(model, name)
        if module is None:
            raise ValueError(f"module {name!r} not found in {type(model).__name__}")
        layout, n_in, n_out = _layout(module, name)
        if module.weight.device.type == "meta":
            raise ValueError(
                f"{name}.weight is on the meta device (offloaded to CPU or disk by accelerate, or not "
                "loaded): an edit must rotate the stored weight in place; load the edited layers onto a "
                "device (a device_map that maps them to a GPU or 'cpu' without offload)")
        targets.append(EditTarget(name, index, module, layout, n_in, n_out))
    return targets


def kernel_args(layout: str, side: str, inverse: bool = False) -> tuple[str, bool]:
    """``(side, transpose)`` for :func:`householder_apply` on a stored weight so that the maths
    weight ``W`` becomes ``W Q^T`` (input side) or ``Q W`` (output side); ``inverse`` undoes it."""
    _check_side(side)
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"weight_layout must be 'out_in' or 'in_out', got {layout!r}")
    # out_in stores W: input side W Q^T = right/transposed, output side Q W = left.
    # in_out stores W^T: input side (W Q^T)^T = Q W^T = left, output side W^T Q^T = right/transposed.
    kernel_side = "right" if (layout == "out_in") == (side == "input") else "left"
    transpose = kernel_side == "right"
    return kernel_side, transpose != inverse


def rotate_weight_(
    weight: Tensor, layout: str, V: Tensor, side: str, *, inverse: bool = False, backend: str = "auto"
) -> Tensor:
    """Apply one edit's reflections ``V`` (``(k, n)``) to a stored weight in place.

    ``side="input"``: ``W <- W Q^T``; ``side="output"``: ``W <- Q W`` (maths layout), whatever the
    storage ``layout``; ``inverse=True`` applies the exact inverse. Runs under ``torch.no_grad``.
    """
    kernel_side, transpose = kernel_args(layout, side, inverse)
    with torch.no_grad():
        return householder_apply_(weight, V.to(weight.device), side=kernel_side, transpose=transpose, backend=backend)


def token_grid(x: Tensor, grid: Sequence[int], *, required: bool = True) -> Tensor | None:
    """``x`` (a projection's input or output) as ``(B, L, ...)`` for a batch of ``(B, L)`` tokens.

    Most models run their MLP on ``(B, L, d)`` activations; OPT runs it on the flattened
    ``(B * L, d)`` tokens, which are reshaped (a view of a contiguous ``x``, so writes reach it).
    A shape that fits neither raises ``ValueError``, or gives ``None`` if not ``required``.
    """
    grid = tuple(grid)
    if x.dim() >= 3 and tuple(x.shape[:2]) == grid:
        return x
    if x.dim() >= 2 and x.shape[0] == math.prod(grid):
        return x.reshape(*grid, *x.shape[1:])
    if required:
        raise ValueError(f"activations of shape {tuple(x.shape)} fit neither (B, L, d) nor (B * L, d) "
                         f"for a batch of {grid} tokens")
    return None


def rotate_activations(x: Tensor, V: Tensor, side: str, *, backend: str = "auto") -> Tensor:
    """Differentiable activation-side form of an edit, rows = tokens.

    ``side="input"``: keys ``x`` (``(..., in)``) become ``x Q`` (i.e. ``Q^T x`` per column), so
    ``W (Q^T x)`` is the input-side edit. ``side="output"``: outputs ``y`` (``(..., out)``, bias
    removed by the caller) become ``y Q^T`` (``Q y`` per column).
    """
    _check_side(side)
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    out = householder_apply(flat, V, side="right", transpose=side == "output", backend=backend)
    return out.reshape(shape)


@contextmanager
def capture_io(
    targets: Sequence[EditTarget], *, detach: bool = True
) -> Iterator[dict[str, list[tuple[Tensor, Tensor]]]]:
    """Record the input and output of every forward of each target.

    Yields a dict ``{target.name: [(input, output), ...]}`` filled as the model runs; the hooks
    are removed on exit, even on error. Tensors are detached unless ``detach=False``.
    """
    records: dict[str, list[tuple[Tensor, Tensor]]] = {t.name: [] for t in targets}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0]
            if detach:
                x, output = x.detach(), output.detach()
            records[name].append((x, output))

        return hook

    try:
        for t in targets:
            handles.append(t.module.register_forward_hook(make_hook(t.name)))
        yield records
    finally:
        for h in handles:
            h.remove()


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once every target has been seen."""


def capture_activations(model: nn.Module, targets: Sequence[EditTarget], **inputs) -> dict[str, tuple[Tensor, Tensor]]:
    """Run ``model(**inputs)`` only as far as needed to record every target's ``(input, output)``
    (detached): the layers after the last target and the LM head are skipped."""
    handles = []

    with capture_io(targets) as io:

        def stop(module: nn.Module, args: tuple, output: Tensor) -> None:
            if all(io[t.name] for t in targets):
                raise _StopForward

        try:
            handles = [t.module.register_forward_hook(stop) for t in targets]
            model(**inputs)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
    missing = [t.name for t in targets if not io[t.name]]
    if missing:
        raise RuntimeError(f"the forward pass never reached {missing}")
    return {t.name: io[t.name][0] for t in targets}
