"""Append-only JSONL results with resume: one record per (state, data set, item, configuration).

Each batch's records are written in one call and flushed to disk before the next batch starts, so a
crash or Ctrl-C loses at most the batch in flight. A torn last line (the process died mid-write) is
cut off the file on reading, so the next append starts on a line of its own, and that item is simply redone. When an item occurs twice (a FAILED judgement
redone on a later run), the last record wins.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from sa_lens.errors import InputError

__all__ = ["ResultStore", "record_key"]


def record_key(state: str, dataset: str, item_id: str, config: str) -> str:
    """The resume key: a record is reused only when all four parts match.

    Args:
        state: the model state's name in the report (``Original``, ``HDR`` …).
        dataset: the data set's name.
        item_id: the item's id within the set.
        config: model id, state fingerprint, decoding digest and judge name, ``|``-separated.

    Returns:
        The four parts joined by the ASCII unit separator (0x1F).
    """
    return f"{state}\x1f{dataset}\x1f{item_id}\x1f{config}"


class ResultStore:
    """Records of one evaluation folder, keyed by :func:`record_key`; in memory only when ``path`` is None.

    Raises:
        ValueError: (on opening) a line other than a torn last one is not valid JSON, or is not a record
            with a ``key`` — the message gives its line number.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self.records: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            self._read()

    def _read(self) -> None:
        assert self.path is not None
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                if lineno == len(lines):  # the torn tail of an interrupted write (no newline yet): redo that item
                    self._cut_torn_tail(text)
                    continue
                raise InputError(
                    f"{self.path}: line {lineno} is not valid JSON ({exc.msg}); the results file was edited "
                    "or corrupted. Delete that line (its item is then redone) and rerun."
                ) from exc
            if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
                raise InputError(
                    f"{self.path}: line {lineno} is not an evaluation record (no 'key'); this file was not written by "
                    "sa_lens.evaluate. Use another report folder."
                )
            self.records[rec["key"]] = rec

    def _cut_torn_tail(self, text: str) -> None:
        # Appending after a torn line would glue the next record onto it and corrupt both: cut it off.
        assert self.path is not None
        keep = len(text[: text.rfind("\n") + 1].encode("utf-8"))
        with self.path.open("r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())

    def _ends_with_newline(self) -> bool:
        assert self.path is not None
        with self.path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def done(self, key: str, retry_failed: bool = True) -> bool:
        """Whether ``key`` has a record (a FAILED judgement counts as not done when ``retry_failed``)."""
        rec = self.records.get(key)
        return rec is not None and not (retry_failed and rec.get("verdict") == "failed")

    def append(self, records: Iterable[dict]) -> None:
        """Store records (each with a ``key``) and, with a path, append them to the file durably."""
        records = list(records)
        for rec in records:
            self.records[rec["key"]] = rec
        if self.path is None or not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A last line that is whole but lacks its newline (the write stopped just before it) gets one first.
        lead = "\n" if self.path.exists() and self.path.stat().st_size and not self._ends_with_newline() else ""
        with self.path.open("a", encoding="utf-8") as f:
            f.write(lead + "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))
            f.flush()
            os.fsync(f.fileno())
