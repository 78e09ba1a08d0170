"""Edit requests and loaders for the common knowledge-editing data formats.

Three on-disk formats are understood:

- ``"easyedit"``: EasyEdit's flat CounterFact records ``{case_id, prompt, subject, target_new,
  ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth}``;
- ``"memit"``: MEMIT/ROME CounterFact records with ``requested_rewrite`` (prompt template with ``{}``
  for the subject, ``target_new.str``, ``target_true.str``), ``paraphrase_prompts`` and
  ``neighborhood_prompts`` (whose answer is the true target);
- ``"zsre"``: MEND zsRE records ``{subject, src, alt, answers, rephrase, loc, loc_ans}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("auto", "easyedit", "memit", "zsre")


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into a model.

    Attributes:
        prompt: text containing ``subject``; ``target_new`` continues it.
        subject: the entity whose fact changes (must occur in ``prompt``).
        target_new: the new continuation, as written in the data (with or without a leading
            space: :mod:`mose_kernels.editing.tokens` handles the join).
        ground_truth: the old continuation, if known.
        rephrase_prompts: paraphrases of ``prompt`` (generalisation).
        locality_prompts: unrelated prompts whose continuation must not change.
        locality_answers: their continuations, same length as ``locality_prompts``.
        case_id: identifier carried from the data set.
    """

    prompt: str
    subject: str
    target_new: str
    ground_truth: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality_prompts: tuple[str, ...] = ()
    locality_answers: tuple[str, ...] = ()
    case_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"EditRequest.{name} must be a str, got {type(value).__name__}")
        if not self.prompt.strip():
            raise ValueError("EditRequest.prompt is empty")
        if not self.subject.strip():
            raise ValueError(f"EditRequest.subject is empty (prompt {self.prompt!r})")
        if not self.target_new.strip():
            raise ValueError(f"EditRequest.target_new is empty (prompt {self.prompt!r})")
        if self.subject not in self.prompt:
            raise ValueError(f"EditRequest.subject {self.subject!r} does not occur in prompt {self.prompt!r}")
        if self.ground_truth is not None and not isinstance(self.ground_truth, str):
            raise TypeError(f"EditRequest.ground_truth must be a str or None, got {type(self.ground_truth).__name__}")
        for name in ("rephrase_prompts", "locality_prompts", "locality_answers"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"EditRequest.{name} must be a tuple of str, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if len(self.locality_prompts) != len(self.locality_answers):
            raise ValueError(
                f"EditRequest has {len(self.locality_prompts)} locality_prompts but "
                f"{len(self.locality_answers)} locality_answers; they must pair up"
            )
        if self.case_id is not None and not isinstance(self.case_id, str):
            object.__setattr__(self, "case_id", str(self.case_id))

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> EditRequest:
        """Build a request from EasyEdit's flat keys (``prompt``, ``subject``, ``target_new``,
        ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``,
        ``case_id``); list values are accepted for the rephrase and locality fields. The
        contract's own field names (``rephrase_prompts``, ``locality_prompts``,
        ``locality_answers``) are accepted too, so ``from_dict(to_dict(r)) == r``."""
        if not isinstance(record, Mapping):
            raise TypeError(f"an edit record must be a dict, got {type(record).__name__}")
        for key in ("prompt", "subject", "target_new"):
            if key not in record:
                raise ValueError(f"edit record is missing the field {key!r} (keys: {sorted(record)})")
        rephrase = _as_tuple(record.get("rephrase_prompts", record.get("rephrase_prompt")), "rephrase_prompt")
        loc_prompts = _as_tuple(record.get("locality_prompts", record.get("locality_prompt")), "locality_prompt")
        loc_answers = _as_tuple(
            record.get("locality_answers", record.get("locality_ground_truth")), "locality_ground_truth"
        )
        case_id = record.get("case_id")
        return cls(
            prompt=record["prompt"],
            subject=record["subject"],
            target_new=_first(record["target_new"], "target_new"),
            ground_truth=_first(record["ground_truth"], "ground_truth") if record.get("ground_truth") else None,
            rephrase_prompts=rephrase,
            locality_prompts=loc_prompts,
            locality_answers=loc_answers,
            case_id=None if case_id is None else str(case_id),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the contract's field names (inverse of :meth:`from_dict`)."""
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "ground_truth": self.ground_truth,
            "rephrase_prompts": list(self.rephrase_prompts),
            "locality_prompts": list(self.locality_prompts),
            "locality_answers": list(self.locality_answers),
            "case_id": self.case_id,
        }


def _as_tuple(value: Any, name: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(f"field {name!r} must be a str or a list of str, got {value!r}")


def _first(value: Any, name: str) -> str:
    """A str, or the first entry of a non-empty list of str (zsRE answers, EasyEdit lists)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("str"), str):
        return value["str"]
    if isinstance(value, Sequence) and value and isinstance(value[0], str):
        return value[0]
    raise TypeError(f"field {name!r} must be a str (or a non-empty list of str), got {value!r}")


def _from_memit(record: Mapping[str, Any]) -> EditRequest:
    rw = record["requested_rewrite"]
    if not isinstance(rw, Mapping):
        raise TypeError(f"'requested_rewrite' must be a dict, got {type(rw).__name__}")
    for key in ("prompt", "subject", "target_new"):
        if key not in rw:
            raise ValueError(f"'requested_rewrite' is missing the field {key!r}")
    template, subject = rw["prompt"], rw["subject"]
    if "{}" not in template:
        raise ValueError(f"'requested_rewrite.prompt' must contain '{{}}' for the subject, got {template!r}")
    neighbours = _as_tuple(record.get("neighborhood_prompts"), "neighborhood_prompts")
    truth = _first(rw["target_true"], "target_true") if rw.get("target_true") else None
    if neighbours and truth is None:
        raise ValueError("'neighborhood_prompts' need 'requested_rewrite.target_true' as their answer")
    return EditRequest(
        prompt=template.format(subject),
        subject=subject,
        target_new=_first(rw["target_new"], "target_new"),
        ground_truth=truth,
        rephrase_prompts=_as_tuple(record.get("paraphrase_prompts"), "paraphrase_prompts"),
        locality_prompts=neighbours,
        locality_answers=(truth,) * len(neighbours) if truth is not None else (),
        case_id=None if record.get("case_id") is None else str(record["case_id"]),
    )


def _from_zsre(record: Mapping[str, Any]) -> EditRequest:
    for key in ("src", "subject", "alt"):
        if key not in record:
            raise ValueError(f"zsRE record is missing the field {key!r} (keys: {sorted(record)})")
    loc = _as_tuple(record.get("loc"), "loc")
    loc_ans = _as_tuple(record.get("loc_ans"), "loc_ans")
    answers = record.get("answers")
    return EditRequest(
        prompt=record["src"],
        subject=record["subject"],
        target_new=_first(record["alt"], "alt"),
        ground_truth=_first(answers, "answers") if answers else None,
        rephrase_prompts=_as_tuple(record.get("rephrase"), "rephrase"),
        locality_prompts=loc,
        locality_answers=loc_ans,
        case_id=None if record.get("case_id") is None else str(record["case_id"]),
    )


_PARSERS = {"easyedit": EditRequest.from_dict, "memit": _from_memit, "zsre": _from_zsre}


def detect_format(record: Mapping[str, Any]) -> str:
    """Name the format of one record: ``"memit"``, ``"zsre"`` or ``"easyedit"``."""
    if not isinstance(record, Mapping):
        raise TypeError(f"an edit record must be a dict, got {type(record).__name__}")
    if "requested_rewrite" in record:
        return "memit"
    if "src" in record and "alt" in record:
        return "zsre"
    if "prompt" in record and "target_new" in record:
        return "easyedit"
    raise ValueError(
        "cannot detect the record format: expected 'requested_rewrite' (memit), 'src' and 'alt' (zsre) "
        f"or 'prompt' and 'target_new' (easyedit); got keys {sorted(record)}"
    )


def parse_records(
    records: Sequence[Mapping[str, Any]], format: str = "auto", source: str = "<records>"
) -> list[EditRequest]:
    """Turn in-memory records into :class:`EditRequest` s (see :func:`load_requests`)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    out = []
    for i, record in enumerate(records):
        try:
            fmt = detect_format(record) if format == "auto" else format
            out.append(_PARSERS[fmt](record))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: record {i}: {exc}") from exc
    return out


def load_requests(path: str | Path, format: str = "auto", limit: int | None = None) -> list[EditRequest]:
    """Load edit requests from a JSON (a list of records) or JSON-lines file.

    Args:
        path: the file.
        format: ``"easyedit"``, ``"memit"``, ``"zsre"`` or ``"auto"`` (detected per record).
        limit: keep only the first ``limit`` records.

    Raises:
        ValueError: unreadable JSON, or a malformed record (the message names the file, the record
            index and the missing or bad field), or an unknown ``format``.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: neither a JSON list nor JSON lines ({exc})") from exc
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    if limit is not None:
        data = data[:limit]
    return parse_records(data, format, source=str(path))
