"""Bundled, project-written prompt sets and readers for user-supplied prompt files.

The package ships seven data files, all written for this project (none is copied from a public
benchmark):

* ``harmful.jsonl``: harmful *requests* (never harmful content), each with a ``category``.
* ``safe.jsonl``: safe requests, ``type`` ``"benign"`` or ``"contrast"`` (XSTest-style prompts
  that sound dangerous but are safe).
* ``qa.jsonl``: short common-knowledge questions with a list of accepted ``answers``.
* ``sft_task.jsonl``: grade-school math word problems with worked answers (the benign SFT task).
* ``edits.jsonl``: CounterFact-style fact edits (Meng et al. 2022) for ROME's efficacy,
  generalisation and specificity: ``subject``, a ``prompt`` with ``{}`` where the subject goes,
  ``target_new`` and ``target_true`` (each with a leading space), ``paraphrase_prompts``,
  ``neighborhood_prompts`` (``{"prompt", "target"}`` about other subjects, to stay unchanged) and
  ``relation``. The default model prefers ``target_true`` before any edit.
* ``noint_edits.jsonl``: NoIntentEdit-style benign question/answer edits whose topics sit near harm
  categories (the paper's EDIT scenario): ``cluster``, ``question``, ``answer``, ``subject`` (a
  phrase found verbatim in the question and the paraphrase) and ``paraphrase``.
* ``refusal_templates.json``: polite refusal responses.

``harmful``, ``safe`` and ``qa`` carry a fixed ``split`` field (``train``/``dev``/``test``,
about 50/20/30, stratified by category or type); ``sft_task``, ``edits`` and ``noint_edits`` have
no splits.

Example:
    >>> from sa_lens.data import load_bundled, load_prompts
    >>> harmful_train = [r["prompt"] for r in load_bundled("harmful", split="train")]
    >>> advbench = load_prompts("harmful_behaviors.csv")  # finds the "goal" column
"""

from __future__ import annotations

import csv
import io
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from sa_lens.errors import InputError

__all__ = [
    "BUNDLED",
    "PROMPT_COLUMNS",
    "SPLITS",
    "DataError",
    "load_bundled",
    "load_prompts",
    "load_records",
    "refusal_templates",
]

BUNDLED: tuple[str, ...] = ("harmful", "safe", "qa", "sft_task", "edits", "noint_edits")
"""Names accepted by :func:`load_bundled`."""

_UNSPLIT: dict[str, str] = {
    "sft_task": "it is all training data",
    "edits": "every row is one edit request",
    "noint_edits": "every row is one edit request",
}
"""Bundled sets without a ``split`` field, with the reason a split makes no sense for each."""

SPLITS: tuple[str, ...] = ("train", "dev", "test")
"""Values of the ``split`` field in the bundled sets."""

PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "goal", "behavior", "question", "instruction", "text")
"""Columns tried, in order and case-insensitively, when no column is given to :func:`load_prompts`."""

_SUFFIXES: tuple[str, ...] = (".csv", ".json", ".jsonl")


class DataError(InputError):
    """A data file is missing, malformed or has no usable prompts.

    The message names the file, the problem (with a 1-based line or row number where one
    applies) and how to fix it.
    """


def _parse_jsonl(text: str, source: str) -> list[dict[str, Any]]:
    """Parse JSON Lines text into a list of objects, skipping blank lines.

    Args:
        text: The file contents.
        source: The file name used in error messages.

    Returns:
        One dict per non-blank line.

    Raises:
        DataError: If a line is not valid JSON or not a JSON object.
    """
    records: list[dict[str, Any]] = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line separators.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{source}: line {lineno} is not valid JSON ({exc.msg}). "
                "Fix that line so each line holds exactly one JSON object."
            ) from exc
        if not isinstance(obj, dict):
            raise DataError(
                f"{source}: line {lineno} is a JSON {type(obj).__name__}, not an object. "
                'Write each line as an object such as {"prompt": "..."}.'
            )
        records.append(obj)
    return records


def _read_bundled(filename: str) -> str:
    """Read a file shipped inside the ``sa_lens.data`` package.

    Args:
        filename: The file name inside the package.

    Returns:
        The file's text.

    Raises:
        DataError: If the file is not in the installed package.
    """
    try:
        return resources.files(__name__).joinpath(filename).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(
            f"bundled data file {filename!r} is missing from the sa_lens package. "
            "Reinstall sa_lens (pip install --force-reinstall sa_lens) to restore it."
        ) from exc


def load_bundled(name: str, split: str | None = None) -> list[dict[str, Any]]:
    """Load one of the data sets bundled with sa_lens.

    Args:
        name: One of ``"harmful"``, ``"safe"``, ``"qa"``, ``"sft_task"``, ``"edits"`` or
            ``"noint_edits"``.
        split: ``"train"``, ``"dev"`` or ``"test"`` to keep only that split; ``None`` keeps
            all records. ``sft_task`` (all training data), ``edits`` and ``noint_edits`` (edit
            requests) have no splits.

    Returns:
        The records as dicts, in file order (a fresh list on every call).

    Raises:
        ValueError: If ``name`` or ``split`` is not one of the valid choices, or a split is
            asked of ``sft_task``, ``edits`` or ``noint_edits``.
        DataError: If the bundled file is missing or malformed.
    """
    if name not in BUNDLED:
        raise InputError(f"unknown bundled data set {name!r}; valid names: {', '.join(BUNDLED)}")
    if split is not None and split not in SPLITS:
        raise InputError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)} (or None for all)")
    if split is not None and name in _UNSPLIT:
        raise InputError(f"{name} has no splits ({_UNSPLIT[name]}); call load_bundled({name!r})")
    filename = f"{name}.jsonl"
    records = _parse_jsonl(_read_bundled(filename), filename)
    if split is None:
        return records
    return [r for r in records if r.get("split") == split]


def refusal_templates() -> list[str]:
    """Return the bundled refusal responses an aligned assistant gives to harmful requests.

    Returns:
        Non-empty strings, each starting with a clear refusal phrase.

    Raises:
        DataError: If the bundled file is missing or is not a JSON list of non-empty strings.
    """
    filename = "refusal_templates.json"
    try:
        templates = json.loads(_read_bundled(filename))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{filename}: not valid JSON ({exc.msg} at line {exc.lineno}). Reinstall sa_lens."
        ) from exc
    if not isinstance(templates, list) or not all(isinstance(t, str) and t.strip() for t in templates):
        raise DataError(f"{filename}: expected a JSON list of non-empty strings. Reinstall sa_lens.")
    return templates


def _read_table(path: Path, text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Parse CSV, JSON or JSONL text into rows and the column names seen.

    Args:
        path: The source file (its suffix picks the format; it names the file in errors).
        text: The file contents.

    Returns:
        The rows and the column names in order of first appearance.

    Raises:
        DataError: If the content does not parse or is not a table of objects.
    """
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        rows = []
        try:
            for row in reader:
                # DictReader files extra fields under None and fills missing ones with None: both mean a
                # ragged row (often an unquoted comma or an unterminated quote), never silently accepted.
                if None in row or None in row.values():
                    raise DataError(
                        f"{path}: line {reader.line_num} has {'more' if None in row else 'fewer'} fields than the "
                        f"header ({len(reader.fieldnames or [])}). Quote fields that contain commas."
                    )
                rows.append(row)
        except csv.Error as exc:
            raise DataError(f"{path}: CSV error at line {reader.line_num} ({exc}). Fix the quoting there.") from exc
        return rows, list(reader.fieldnames or [])
    if suffix == ".jsonl":
        rows = _parse_jsonl(text, str(path))
    else:
        rows = _json_rows(path, text)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return rows, columns


def _json_rows(path: Path, text: str) -> list[dict[str, Any]]:
    """Rows of a ``.json`` file in any of the shapes the public sets publish.

    * a list of objects (hub exports such as HarmfulQA's ``data_for_hub.json``);
    * a list of strings, one prompt each (DangerousQA's ``dangerousqa.json``);
    * categories nesting lists of strings, ``{category: [q, ...]}`` or ``{category: {subcategory: [q, ...]}}``
      (declare-lab's ``catqa_english.json`` and ``harmfulqs.json``): each string becomes a row with ``prompt``,
      ``category`` (the outer key) and ``subcategory`` (the inner keys joined by " / ", "" when there are none);
    * one object per line (a single object is one row), as ``datasets`` also reads a ``.json`` file.

    Raises:
        DataError: text that parses neither as JSON nor as JSON lines, or a shape other than the above (the
            message names the first offending entry).
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        lines = [line for line in text.split("\n") if line.strip()]
        if len(lines) > 1 and lines[0].lstrip().startswith("{"):
            return _parse_jsonl(text, str(path))
        raise DataError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}). "
            "Fix the file, or save one object per line as .jsonl."
        ) from exc
    if isinstance(data, dict) and not any(isinstance(v, (dict, list)) for v in data.values()):
        return [data]  # JSON lines with a single line: one row, as datasets reads it
    if isinstance(data, dict):
        return _nested_rows(path, data)
    if isinstance(data, list) and data and all(isinstance(r, str) for r in data):
        return [{"prompt": r} for r in data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(
            f"{path}: expected a JSON list of objects such as "
            '[{"prompt": "..."}, ...]; convert the file to that shape.'
        )
    return data


def _nested_rows(path: Path, tree: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten ``{category: {subcategory: [question, ...]}}`` (any depth ≥ 1) into rows, in file order."""
    rows: list[dict[str, Any]] = []

    def walk(node: Any, keys: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, (*keys, str(key).strip()))
        elif isinstance(node, list) and keys and all(isinstance(q, str) for q in node):
            rows.extend({"prompt": q, "category": keys[0], "subcategory": " / ".join(keys[1:])} for q in node)
        else:
            where = " → ".join(map(repr, keys)) or "the top level"
            raise DataError(
                f"{path}: under {where} expected a list of question strings or an object of them, got a "
                f"{type(node).__name__}. Nested files must hold category → (subcategory →) list of questions."
            )

    walk(tree, ())
    return rows


def load_records(path: str | os.PathLike[str], column: str | None = None) -> list[dict[str, Any]]:
    """Read prompt records from a local CSV, JSON or JSONL file.

    A JSON file may hold a list of objects, a list of strings, categories nesting lists of questions
    (``{category: {subcategory: [q, ...]}}``, which gain ``category`` and ``subcategory`` fields) or one
    object per line. Every returned record keeps all the row's original fields (for example a ``category``
    column) and gains a ``"prompt"`` key holding the text of the chosen column.

    Args:
        path: The file to read; its suffix (``.csv``, ``.json`` or ``.jsonl``) picks the format.
        column: The column holding the prompts, matched case-insensitively. ``None`` tries
            ``prompt``, ``goal``, ``behavior``, ``question``, ``instruction`` and ``text``
            in that order.

    Returns:
        One dict per row, in file order.

    Raises:
        DataError: If the file is missing, empty, malformed, has an unsupported suffix, has
            no usable column, or a row's prompt is empty or not a string.
    """
    path = Path(path)
    if path.suffix.lower() not in _SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
            f"supported: {', '.join(_SUFFIXES)}. Convert or rename the file."
        )
    if not path.is_file():
        raise DataError(f"{path}: file not found. Check the path (relative paths start at {Path.cwd()}).")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}). Re-save it as UTF-8.") from exc
    if not text.strip():
        raise DataError(f"{path}: the file is empty. Add one prompt per row.")

    rows, columns = _read_table(path, text)
    if not rows:
        raise DataError(f"{path}: the file has no data rows. Add one prompt per row.")

    by_lower = {c.lower(): c for c in reversed(columns)}  # first spelling wins on a clash
    wanted = (column,) if column is not None else PROMPT_COLUMNS
    chosen = next((by_lower[w.lower()] for w in wanted if w.lower() in by_lower), None)
    if chosen is None:
        problem = f"no column {column!r}" if column is not None else f"no prompt column ({', '.join(PROMPT_COLUMNS)})"
        raise DataError(
            f"{path}: {problem}; columns found: {', '.join(map(repr, columns)) or 'none'}. "
            "Pass column=<name> (CLI: --harmful-column <name>) to choose one."
        )

    records: list[dict[str, Any]] = []
    for rowno, row in enumerate(rows, start=1):
        value = row.get(chosen)
        if not isinstance(value, str) or not value.strip():
            problem = "is empty" if value is None or isinstance(value, str) else f"is a {type(value).__name__}, not text"
            raise DataError(
                f"{path}: row {rowno}: column {chosen!r} {problem}. "
                "Fill in or delete that row, or choose another column."
            )
        records.append({**row, "prompt": value.strip()})
    return records


def load_prompts(path: str | os.PathLike[str], column: str | None = None) -> list[str]:
    """Read prompts from a local CSV, JSON (list of objects, or of strings) or JSONL file.

    Args:
        path: The file to read; its suffix (``.csv``, ``.json`` or ``.jsonl``) picks the format.
        column: The column holding the prompts, matched case-insensitively. ``None`` tries
            ``prompt``, ``goal``, ``behavior``, ``question``, ``instruction`` and ``text``
            in that order.

    Returns:
        The prompts, stripped of surrounding whitespace, in file order.

    Raises:
        DataError: See :func:`load_records`.
    """
    return [record["prompt"] for record in load_records(path, column)]
