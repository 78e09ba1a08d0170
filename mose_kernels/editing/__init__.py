"""Knowledge editing with multiplicative orthogonal (Householder) edits: requests, tokenisation,
model adapters, solvers, the edit journal and the editor."""

from mose_kernels.editing.adapters import EditTarget, capture_io, find_edit_targets, num_layers
from mose_kernels.editing.config import EditConfig, preset_for
from mose_kernels.editing.editor import EditResult, MoseEditor, edit
from mose_kernels.editing.journal import EditJournal, JournalEntry
from mose_kernels.editing.requests import EditRequest, load_requests
from mose_kernels.editing.solvers.common import EditError
from mose_kernels.editing.tokens import PromptTarget, batch_prompt_targets, encode_prompt_target

__all__ = [
    "EditConfig",
    "EditError",
    "EditJournal",
    "EditRequest",
    "EditResult",
    "EditTarget",
    "JournalEntry",
    "MoseEditor",
    "PromptTarget",
    "batch_prompt_targets",
    "capture_io",
    "edit",
    "encode_prompt_target",
    "find_edit_targets",
    "load_requests",
    "num_layers",
    "preset_for",
]
