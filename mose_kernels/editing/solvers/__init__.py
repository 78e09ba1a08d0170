"""Edit solvers: each turns one request into fresh Householder vectors per edited layer."""

from mose_kernels.editing.solvers.common import EditError, SolveResult

__all__ = ["EditError", "SolveResult"]
