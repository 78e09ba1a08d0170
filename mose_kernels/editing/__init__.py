"""Knowledge editing with multiplicative orthogonal (Householder) edits: requests, tokenisation,
model adapters, solvers, the edit journal and the editor."""

from mose_kernels.editing.adapters import EditTarget, capture_io, find_edit_targets, num_layers
from mose_kernels.editing.requests import EditRequest, load_requests
from mose_kernels.editing.tokens import PromptTarget, batch_prompt_targets, encode_prompt_target

__all__ = [
    "EditRequest",
    "EditTarget",
    "PromptTarget",
    "batch_prompt_targets",
    "capture_io",
    "encode_prompt_target",
    "find_edit_targets",
    "load_requests",
    "num_layers",
]
