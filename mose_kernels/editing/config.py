"""Settings of an editing run (:class:`EditConfig`) and the presets shipped per model family."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mose_kernels.editing.adapters import EDIT_SIDES, num_layers

SOLVERS = ("gradient", "procrustes")
OPTIMIZERS = ("adam", "ngd")
EDIT_POSITIONS = ("all", "subject", "subject_last")
PRESET_DIR = Path(__file__).resolve().parent / "presets"
KEEP_CORPUS_FILE = Path(__file__).resolve().parent.parent / "data" / "keep_corpus.txt"
NEIGHBOUR_SUBJECTS_FILE = Path(__file__).resolve().parent.parent / "data" / "neighbour_subjects.txt"
MODEL_SAMPLES = "model-samples"


@dataclass
class EditConfig:
    """How edits are computed and kept.

    Attributes:
        layers: layer indices of the MLP output projections to edit (``None``: the preset's).
        template: module template overriding the architecture lookup (``"model.layers.{}.mlp.down_proj"``).
        solver: ``"gradient"`` (learned reflections, Adam) or ``"procrustes"`` (closed form).
        side: ``"input"`` (``W <- W Q^T``, acts on keys) or ``"output"`` (``W <- Q W``, acts on values).
        num_reflections: Householder vectors per edit and layer (gradient solver; even: pairs).
        steps: most optimisation steps per edit (gradient solver; also the value search of procrustes).
        lr: learning rate of the gradient solver's optimiser.
        optimizer: gradient solver: ``"adam"``, or ``"ngd"`` (normalised gradient descent with
            momentum 0.8: each step moves a layer's vectors by ``lr`` times their norm along the
            momentum-averaged gradient's direction, where Adam's first steps move every
            coordinate by ``lr``, the gradient's signs).
        stop_loss: stop once every target token is the argmax and the mean target NLL is below this.
        edit_positions: ``"all"`` tokens see the rotation while solving, only the ``"subject"``'s,
            or only the subject's last token (``"subject_last"``, ROME's key position).
        context_prefixes: extra texts prepended to the prompt in the loss (generalisation).
        kl_weight: weight of a KL term keeping the next-token distributions of ``neighbour_prompts``.
        neighbour_prompts: generic prompts for that KL term.
        corpus_weight: weight of a penalty on the edit's relative change (squared) of the keep
            corpus's outputs at the edited layers: the soft counterpart of the hard corpus
            directions, acting on everything outside them (gradient solver; ``0``: off).
        edit_keys_weight: weight of the same penalty on earlier edits' keys (all of them, through
            their second moment, for layers up to 4096 wide; a seeded uniform sample of 8192 for
            wider ones): the soft counterpart of the keep subspace's edit part, acting on what its
            compression released. With ``keep_edits`` it is skipped for a layer until that layer's
            keep subspace has released directions (before, it is zero up to rounding); gradient
            solver; ``0``: off. On SmolLM2 3000 raised efficacy after 1000 sequential edits from
            0.455 to 0.516-0.531 (README, Studies); it is in that preset.
        keep_edits: protect earlier edits' keys (their projection inputs at all positions).
        keep_tol: a key's component outside the keep subspace is added when above this fraction
            of the key batch's largest singular value.
        keep_corpus_dirs: number of principal directions of a sample corpus to protect.
        keep_corpus: texts of that corpus. ``None``: the shipped English corpus
            (``mose_kernels/data/keep_corpus.txt``: short factual statements about many entities and
            relations, plus everyday prose, written for this project); ``"model-samples"``: texts
            sampled from the model itself (for models of other languages).
        keep_neighbours: copies of each edit's prompt with its subject replaced by other entities
            (people, places, organisations, works: ``mose_kernels/data/neighbour_subjects.txt``)
            whose vectors, at every position, the edit must leave unchanged. They stand for
            the same relation asked of another subject, so the edit has to act through what is
            specific to its subject. Kept for that edit only; ``0`` turns it off.
        keep_capacity: fraction of the vector dimension the keep subspace may fill; above it the
            edit directions are compressed to the top principal directions of all earlier edits'
            keys (incremental PCA, see :mod:`mose_kernels.editing.keep`).
        keep_max_dim: most directions a layer's keep subspace may hold whatever ``n`` (``None``: no
            cap beyond ``keep_capacity``). The subspace is stored in float64 as ``n x dim`` plus a
            ``dim x dim`` moment, so a fraction of ``n`` grows with ``n^2`` (LLaMA-3-8B's input side,
            ``n = 14336``: 2.0 GiB per layer at 0.75; LLaMA-3-70B's, 28672: 8 GiB); the cap keeps
            it ``O(n keep_max_dim)``. The default 4096 binds from ``n = 5462`` on (7B models and
            up), never on SmolLM2 or GPT-2 small.
        procrustes_lambda: weight of the corpus-preservation term of the closed form.
        value_steps, value_lr: ROME-style search of the target value (procrustes solver).
        isolate_subject: keep the rotation off the edit prompt's other positions too (prompt,
            target and prefixed copies; for this edit only: the keep subspace takes those keys
            after the commit anyway), so within the prompt it acts on the subject's last token
            alone: where the procrustes solver searched the target, and where the gradient
            solver's committed rotation then acts exactly as while solving (otherwise it also
            turns the subject's leading tokens, shared with other entities, and the relation's).
        backend: kernel backend of the commit and of the solver's autograd.
        keep_fp32_master: half-precision models keep an fp32 copy of each edited weight.
        seed: seed of the vector initialisation.
    """

    layers: list[int] | None = None
    template: str | None = None
    solver: str = "gradient"
    side: str = "input"
    num_reflections: int = 8
    steps: int = 25
    lr: float = 3e-2
    optimizer: str = "adam"
    stop_loss: float = float("inf")
    edit_positions: str = "all"
    context_prefixes: list[str] = field(default_factory=list)
    kl_weight: float = 0.0
    neighbour_prompts: list[str] = field(default_factory=list)
    corpus_weight: float = 0.0
    edit_keys_weight: float = 0.0
    keep_edits: bool = True
    keep_tol: float = 1e-3
    keep_corpus_dirs: int = 64
    keep_corpus: list[str] | str | None = None
    keep_neighbours: int = 0
    keep_capacity: float = 0.75
    keep_max_dim: int | None = 4096
    procrustes_lambda: float = 1.0
    value_steps: int = 25
    value_lr: float = 5e-1
    isolate_subject: bool = False
    backend: str = "auto"
    keep_fp32_master: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.side not in EDIT_SIDES:
            raise ValueError(f"side must be one of {EDIT_SIDES}, got {self.side!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.edit_positions not in EDIT_POSITIONS:
            raise ValueError(f"edit_positions must be one of {EDIT_POSITIONS}, got {self.edit_positions!r}")
        if self.layers is not None:
            self.layers = [int(x) for x in self.layers]
        if not isinstance(self.num_reflections, int) or self.num_reflections < 1:
            raise ValueError(f"num_reflections must be a positive int, got {self.num_reflections!r}")
        if self.steps < 0 or self.value_steps < 0:
            raise ValueError("steps and value_steps must be non-negative")
        if not 0.0 < self.keep_capacity <= 1.0:
            raise ValueError(f"keep_capacity must be in (0, 1], got {self.keep_capacity}")
        if self.keep_max_dim is not None and (not isinstance(self.keep_max_dim, int) or self.keep_max_dim < 1):
            raise ValueError(f"keep_max_dim must be a positive int or None, got {self.keep_max_dim!r}")
        if not isinstance(self.keep_neighbours, int) or self.keep_neighbours < 0:
            raise ValueError(f"keep_neighbours must be a non-negative int, got {self.keep_neighbours!r}")
        if self.corpus_weight < 0 or self.kl_weight < 0 or self.edit_keys_weight < 0:
            raise ValueError(f"corpus_weight, edit_keys_weight and kl_weight must be >= 0, got {self.corpus_weight}, "
                             f"{self.edit_keys_weight}, {self.kl_weight}")
        if self.keep_corpus_dirs < 0 or self.keep_tol < 0 or self.lr <= 0:
            raise ValueError("keep_corpus_dirs and keep_tol must be >= 0 and lr > 0")
        self.context_prefixes = list(self.context_prefixes)
        if isinstance(self.keep_corpus, str) and self.keep_corpus != MODEL_SAMPLES:
            raise ValueError(f"keep_corpus must be a list of texts, None (the shipped corpus) or {MODEL_SAMPLES!r}, "
                             f"got the string {self.keep_corpus!r}")
        if self.keep_corpus is not None and not isinstance(self.keep_corpus, str):
            self.keep_corpus = list(self.keep_corpus)
            if not self.keep_corpus or not all(isinstance(t, str) and t.strip() for t in self.keep_corpus):
                raise ValueError("keep_corpus must hold at least one non-empty text")

    def keep_room(self, n: int) -> int:
        """Most directions of a keep subspace of ``R^n``: ``keep_capacity * n``, capped by ``keep_max_dim``."""
        room = int(self.keep_capacity * n)
        return room if self.keep_max_dim is None else min(room, self.keep_max_dim)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EditConfig:
        """Build from a dict; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown EditConfig keys {unknown}; known: {sorted(names)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)


def keep_corpus_label(corpus: list[str] | str | None) -> str:
    """How reports name a ``keep_corpus`` setting."""
    if corpus is None:
        return "shipped keep_corpus.txt"
    return corpus if isinstance(corpus, str) else f"{len(corpus)} texts"


def shipped_keep_corpus() -> list[str]:
    """The texts of the shipped keep corpus (one per line of :data:`KEEP_CORPUS_FILE`)."""
    return [line for line in KEEP_CORPUS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def neighbour_subjects() -> list[str]:
    """The shipped substitute subjects of ``keep_neighbours`` (one per line of :data:`NEIGHBOUR_SUBJECTS_FILE`)."""
    return [line.strip() for line in NEIGHBOUR_SUBJECTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def _preset_name(model) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if model_type == "gpt2":
        return "gpt2"
    if model_type == "llama" and hidden is not None and hidden <= 1024:
        return "smollm2-135m"
    if model_type == "llama":
        return "llama-3-8b"
    if model_type == "qwen2":
        return "qwen2.5-7b"
    if model_type == "mistral":
        return "mistral-7b"
    return "default"


def load_preset(name: str) -> dict[str, Any]:
    """The settings of a shipped preset (``presets/<name>.json``), without its ``notes``."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
        raise ValueError(f"no preset named {name!r}; shipped presets: {known}")
    values = json.loads(path.read_text())
    values.pop("notes", None)
    return values


def preset_for(model) -> EditConfig:
    """The preset matching ``model``'s architecture and size; layers are scaled to the model's
    depth when the preset's layers do not exist (``"layers_fraction"``)."""
    values = load_preset(_preset_name(model))
    fraction = values.pop("layers_fraction", None)
    total = num_layers(model)
    layers = values.get("layers")
    if layers is None or max(layers) >= total:
        centre = round((fraction if fraction is not None else 0.6) * (total - 1))
        count = len(layers) if layers else 3
        start = max(0, min(centre - count // 2, total - count))
        values["layers"] = list(range(start, start + min(count, total)))
    return EditConfig.from_dict(values)
