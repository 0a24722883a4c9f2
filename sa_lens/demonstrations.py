"""In-context demonstrations for Safe-Align's ICV (paper §3.2): a question, an unsafe answer, a safe answer.

One file format for every command that reads demonstrations (``sa-lens safety-vector --pairs``,
``sa-lens run --pairs``): CSV, JSON or JSONL with the columns ``question``, ``unsafe_answer`` and optionally
``safe_answer`` (default: the official refusal, :data:`~sa_lens.safety_vector.SAFE_DEMO_ANSWER`).

Example:
    >>> demos = load_demonstrations("pairs.jsonl")
    >>> sv = SafetyVector.from_pairs(model, demonstration_pairs(demos))
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sa_lens.data import load_records
from sa_lens.errors import InputError
from sa_lens.safety_vector import SAFE_DEMO_ANSWER, demonstration_text

__all__ = ["COLUMNS", "Demonstration", "demonstration_pairs", "load_demonstrations"]

COLUMNS: tuple[str, str, str] = ("question", "unsafe_answer", "safe_answer")
"""The canonical columns of a demonstrations file, matched case-insensitively; ``safe_answer`` is optional."""

# Canonical → the name `sa-lens run --pairs` used to read; still accepted, with a warning.
_OLD_NAMES = {"unsafe_answer": "unsafe", "safe_answer": "safe"}


@dataclass(frozen=True)
class Demonstration:
    """One demonstration: a harmful question, an answer that complies, and one that refuses.

    Args:
        question: the request, as the user would write it.
        unsafe_answer: a compliant (harmful) answer; the ICV points from the safe text toward this one.
        safe_answer: a refusal; default the official one, :data:`~sa_lens.safety_vector.SAFE_DEMO_ANSWER`.

    Raises:
        InputError: a field is not a non-empty string.
    """

    question: str
    unsafe_answer: str
    safe_answer: str = SAFE_DEMO_ANSWER

    def __post_init__(self) -> None:
        for name in COLUMNS:
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"Demonstration.{name} must be non-empty text; got {value!r}.")

    def __repr__(self) -> str:
        safe = "default" if self.safe_answer == SAFE_DEMO_ANSWER else _short(self.safe_answer)
        return f"Demonstration({_short(self.question)}, unsafe={_short(self.unsafe_answer)}, safe={safe})"


def _short(text: str, width: int = 24) -> str:
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def load_demonstrations(path: str | os.PathLike[str]) -> list[Demonstration]:
    """Read demonstrations from a CSV, JSON or JSONL file, one per row, in file order.

    Columns are matched case-insensitively: ``question``, ``unsafe_answer`` and optionally ``safe_answer`` (an
    empty or absent one is the official refusal). The old names ``unsafe`` and ``safe`` are read
    too, with a :class:`FutureWarning` naming the canonical columns. Texts are stripped of surrounding space.

    Returns:
        One :class:`Demonstration` per row.

    Raises:
        InputError: the file is missing, malformed or empty (:class:`~sa_lens.data.DataError`), has no question
            or unsafe-answer column, a row's question is empty, rows lack an unsafe answer or hold a safe answer
            that is not text (their 1-based numbers are named).
    """
    records, old = load_records(path, "question"), []
    columns: dict[str, str] = {}  # lower case → the file's first spelling, in order of first appearance
    for r in records:
        for k in r:
            columns.setdefault(k.lower(), k)
    unsafe, old_unsafe = _column(columns, "unsafe_answer")
    safe, old_safe = _column(columns, "safe_answer")
    if unsafe is None:
        found = ", ".join(repr(c) for c in columns.values() if c != "prompt")  # "prompt": load_records' own
        raise InputError(f"{path}: no 'unsafe_answer' column; columns found: {found}. Each row needs "
                         "question, unsafe_answer and optionally safe_answer.")
    old += [name for name, is_old in ((unsafe, old_unsafe), (safe, old_safe)) if is_old]
    if old:
        warnings.warn(f"{path}: {', '.join(map(repr, old))} are old column names; rename them to the canonical "
                      f"{', '.join(COLUMNS)} (safe_answer optional).", FutureWarning, stacklevel=2)
    missing = [rowno for rowno, r in enumerate(records, start=1) if not _is_text(r.get(unsafe))]
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise InputError(f"{path}: no {unsafe!r} text in row(s) {', '.join(map(str, missing[:10]))}{more}; each "
                         "demonstration needs an unsafe answer: fill in or delete those rows.")
    odd = [rowno for rowno, r in enumerate(records, start=1) if r.get(safe) is not None and not isinstance(r[safe], str)]
    if odd:
        raise InputError(f"{path}: {safe!r} in row(s) {', '.join(map(str, odd[:10]))} is not text; write the "
                         "refusal as text, or leave it empty for the official one.")
    return [Demonstration(r["prompt"], r[unsafe].strip(), (r.get(safe) or "").strip() or SAFE_DEMO_ANSWER)
            for r in records]


def demonstration_pairs(demos: Iterable[Demonstration]) -> list[tuple[str, str]]:
    """The (unsafe text, safe text) pairs :meth:`SafetyVector.from_pairs` reads, in the official template.

    Returns:
        ``(demonstration_text(q, unsafe_answer), demonstration_text(q, safe_answer))`` per demonstration.
    """
    return [(demonstration_text(d.question, d.unsafe_answer), demonstration_text(d.question, d.safe_answer))
            for d in demos]


def _column(columns: dict[str, str], canonical: str) -> tuple[str | None, bool]:
    """The file's spelling of a canonical column or else of its old name, and whether it is the old one."""
    if canonical in columns:
        return columns[canonical], False
    old = _OLD_NAMES[canonical]
    return columns.get(old), old in columns


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())
