"""Test configuration shared by every test module.

Without a GPU, Triton kernels run through the interpreter: TRITON_INTERPRET must be set before
triton is first imported, so it is set here, at collection time.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout (or ``MOSE_SHARED_DATA``), if present."""
    candidate = Path(os.environ.get("MOSE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    return candidate if candidate.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    """Folder of the shared data files; skips (with the reason shown) where it does not exist."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared data folder ../shared/data not found (set MOSE_SHARED_DATA to point at it)")
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make ``torch.empty`` return NaN-filled tensors, so that reads of unwritten outputs show up."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", nan_empty)
