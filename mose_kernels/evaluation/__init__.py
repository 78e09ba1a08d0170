"""Evaluation of sequential knowledge editing: metrics (see ``METRICS.md``), the after-each and
after-all protocols, additive baselines on the same layers, and the report folder with plots."""

from mose_kernels.evaluation.models import DEFAULT_MODEL, ModelNotFoundError, load_model

__all__ = ["DEFAULT_MODEL", "ModelNotFoundError", "load_model"]
