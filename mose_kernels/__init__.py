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

__all__ = [
    "__version__",
    "available_backends",
    "householder_apply",
    "householder_apply_",
    "householder_matrix",
    "wy_factor",
]
