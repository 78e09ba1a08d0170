"""mose_kernels: multiplicative orthogonal sequential editing (MOSE) of language models.

Kernels apply a product of Householder reflections ``Q = H_1 ... H_k`` to large weight matrices
through the compact-WY form, never forming ``Q``; the editing API builds on them.
"""

from mose_kernels.backends import available_backends
from mose_kernels.functional import (
    householder_apply,
    householder_apply_,
    householder_matrix,
    wy_factor,
)

__version__ = "0.1.0"

# The editing API is imported on first use, so that kernel users do not pay for transformers.
_EDITING_NAMES = ("EditConfig", "EditJournal", "EditRequest", "EditResult", "MoseEditor", "edit", "load_requests")


def __getattr__(name: str):
    if name in _EDITING_NAMES:
        from mose_kernels import editing

        return getattr(editing, name)
    raise AttributeError(f"module 'mose_kernels' has no attribute {name!r}")


__all__ = [
    "EditConfig",
    "EditJournal",
    "EditRequest",
    "EditResult",
    "MoseEditor",
    "__version__",
    "available_backends",
    "edit",
    "householder_apply",
    "householder_apply_",
    "householder_matrix",
    "load_requests",
    "wy_factor",
]
