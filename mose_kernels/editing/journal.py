"""The edit journal: every committed edit's vectors and metadata, saved atomically, replayable.

Because each edit is an orthogonal factor stored as Householder vectors, the journal is a
complete, compact description of the edited model: ``replay`` on a fresh copy of the base model
reproduces the edited weights, and any edit can be undone exactly (``Q^{-1} = Q^T``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mose_kernels._files import atomic_write
from mose_kernels.editing.adapters import find_edit_targets, rotate_weight_
from mose_kernels.editing.requests import EditRequest

INDEX_FILE = "journal.json"
TENSOR_FILE = "journal.safetensors"
FORMAT_VERSION = 1


@dataclass
class JournalEntry:
    """One committed edit.

    Attributes:
        edit_id: unique, increasing id.
        request: the request it wrote; ``batch``: further requests the same rotation wrote (a
            procrustes batch solve); ``requests``: all of them.
        side: ``"input"`` or ``"output"``.
        vectors: per edited module name, ``(k, n)`` float32 Householder vectors (CPU).
        layouts: per module name, its weight layout (``"out_in"`` or ``"in_out"``).
        layers: per module name, its layer index.
        solver: solver name; ``settings``: the config it ran with; ``metrics``: its outcome.
    """

    edit_id: int
    request: EditRequest
    side: str
    vectors: dict[str, Tensor]
    layouts: dict[str, str]
    layers: dict[str, int]
    solver: str
    settings: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    batch: list[EditRequest] = field(default_factory=list)

    @property
    def requests(self) -> list[EditRequest]:
        return [self.request, *self.batch]

    def meta(self) -> dict[str, Any]:
        meta = {
            "edit_id": self.edit_id,
            "request": self.request.to_dict(),
            "side": self.side,
            "modules": list(self.vectors),
            "layouts": self.layouts,
            "layers": self.layers,
            "solver": self.solver,
            "settings": self.settings,
            "metrics": self.metrics,
        }
        if self.batch:
            meta["batch"] = [r.to_dict() for r in self.batch]
        return meta


class EditJournal:
    """Ordered list of :class:`JournalEntry` plus the keep-subspace state of each edited module."""

    def __init__(self, entries: Sequence[JournalEntry] = (), keep_state: dict[str, dict[str, Tensor]] | None = None,
                 config: dict[str, Any] | None = None) -> None:
        self.entries: list[JournalEntry] = list(entries)
        self.keep_state: dict[str, dict[str, Tensor]] = dict(keep_state or {})
        self.config: dict[str, Any] = dict(config or {})

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[JournalEntry]:
        return iter(self.entries)

    def next_id(self) -> int:
        return self.entries[-1].edit_id + 1 if self.entries else 0

    def index(self, edit_id: int) -> int:
        """Position of ``edit_id`` in :attr:`entries`."""
        for i, entry in enumerate(self.entries):
            if entry.edit_id == edit_id:
                return i
        raise KeyError(f"no edit with id {edit_id} in the journal (ids {[e.edit_id for e in self.entries]})")

    def save(self, path: str | Path) -> Path:
        """Write ``journal.safetensors`` and ``journal.json`` into the folder ``path``, each atomically
        (temp file + ``os.replace``; tensors first, so an index never names missing tensors)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        for entry in self.entries:
            for name, V in entry.vectors.items():
                tensors[f"edit.{entry.edit_id}.{name}"] = V.detach().float().cpu().contiguous()
        for name, state in self.keep_state.items():
            for key, value in state.items():
                tensors[f"keep.{key}.{name}"] = value.detach().cpu().contiguous()
        index = {"format_version": FORMAT_VERSION, "config": self.config, "entries": [e.meta() for e in self.entries],
                 "keep_modules": sorted(self.keep_state)}
        atomic_write(folder / TENSOR_FILE, lambda tmp: save_file(tensors, tmp))
        atomic_write(folder / INDEX_FILE, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1)))
        return folder

    @classmethod
    def load(cls, path: str | Path) -> EditJournal:
        """Read a journal written by :meth:`save`."""
        folder = Path(path)
        index_path, tensor_path = folder / INDEX_FILE, folder / TENSOR_FILE
        if not index_path.is_file() or not tensor_path.is_file():
            raise ValueError(f"{folder} is not an edit journal: expected {INDEX_FILE} and {TENSOR_FILE}")
        index = json.loads(index_path.read_text())
        if index.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{index_path}: unsupported journal format {index.get('format_version')!r}")
        tensors = load_file(str(tensor_path))
        entries = []
        for meta in index["entries"]:
            vectors = {}
            for name in meta["modules"]:
                key = f"edit.{meta['edit_id']}.{name}"
                if key not in tensors:
                    raise ValueError(f"{tensor_path}: missing tensor {key!r}")
                vectors[name] = tensors[key]
            entries.append(JournalEntry(
                edit_id=meta["edit_id"], request=EditRequest.from_dict(meta["request"]), side=meta["side"],
                vectors=vectors, layouts=meta["layouts"], layers={k: int(v) for k, v in meta["layers"].items()},
                solver=meta["solver"], settings=meta["settings"], metrics=meta["metrics"],
                batch=[EditRequest.from_dict(r) for r in meta.get("batch", [])],
            ))
        keep_state: dict[str, dict[str, Tensor]] = {name: {} for name in index.get("keep_modules", [])}
        for key, value in tensors.items():
            if key.startswith("keep."):
                _, field_name, name = key.split(".", 2)
                if name in keep_state:
                    keep_state[name][field_name] = value
        return cls(entries, keep_state, index.get("config"))

    def modules(self) -> list[str]:
        """Names of every module some entry edits, in first-edit order."""
        return list(dict.fromkeys(name for e in self.entries for name in e.vectors))

    def replay(self, model: nn.Module, *, backend: str = "auto", template: str | None = None) -> nn.Module:
        """Apply every entry, in order, to ``model`` (a fresh copy of the base model), in place.

        Half-precision weights are rotated in an fp32 copy and rounded once at the end, as the
        editor does with its fp32 master.
        """
        if not self.entries:
            return model
        targets = {}
        for entry in self.entries:
            for name, layer in entry.layers.items():
                if name not in targets:
                    tmpl = template or name.replace(f".{layer}.", ".{}.", 1)
                    (targets[name],) = find_edit_targets(model, [layer], template=tmpl)
        work = {}
        for name, t in targets.items():
            w = t.weight.data
            work[name] = w.float().clone() if w.dtype in (torch.float16, torch.bfloat16) else w
        for entry in self.entries:
            for name, V in entry.vectors.items():
                rotate_weight_(work[name], entry.layouts[name], V, entry.side, backend=backend)
        with torch.no_grad():
            for name, t in targets.items():
                if work[name] is not t.weight.data:
                    t.weight.data.copy_(work[name])
        return model
