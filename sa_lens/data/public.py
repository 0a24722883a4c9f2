"""Public benchmark sets by name (Hugging Face hub copy) or from a local file or folder.

Harm sets of the paper (paper-notes.md §4.1: AdvBench, DangerousQA, HarmfulQA, NicheHazardQA, HEx-PHI), the
sets peers report (HarmBench, JailbreakBench JBB-Behaviors, StrongREJECT, CatQA), the over-refusal set
(XSTest, §4.4) and the multiple-choice utility sets (MMLU, TruthfulQA MC1/MC2, §4.5).

By name, a set is read from its public hub copy through ``datasets`` (optional extra ``sa_lens[hub]``); a
machine without a hub gets a :class:`~sa_lens.data.DataError` that says how to pass a local copy with
``path=``. A local folder is searched for the upstream file names (e.g. ``harmful_behaviors.csv``); a local
file is read as CSV, JSON or JSONL with case-insensitive columns, malformed lines reported by number. Each set
loads from each form it is published in, to the same prompts and categories: the hub rows, and the authors' own
files — including declare-lab's nested ``{category: {subcategory: [question, …]}}`` JSON (CatQA's
``catqa_english.json``, HarmfulQA's ``harmfulqs.json``), HEx-PHI's headerless ``category_<k>.csv`` files, MMLU's
headerless ``data/<split>/<subject>_<split>.csv`` and TruthfulQA's ``data/mc_task.json``.

Example:
    >>> from sa_lens.data.public import load_public
    >>> adv = load_public("advbench", path="data/advbench")          # folder or file
    >>> xs = load_public("xstest", path="xstest_prompts.csv")        # the 250 safe prompts, type kept
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from sa_lens.data import DataError, load_records
from sa_lens.errors import InputError

__all__ = [
    "ALIASES",
    "MCItem",
    "MCSet",
    "PUBLIC_SETS",
    "PromptSet",
    "PublicSource",
    "QASet",
    "load_bundled_set",
    "load_public",
    "load_public_file",
    "resolve_names",
]

Kind = Literal["harmful", "safe", "mc"]


def _set_repr(data_set: PromptSet | MCSet | QASet, **extra: object) -> str:
    """``Kind(name=…, kind=…, n=…, …, source=…)``: what a set is, not its thousands of prompts."""
    fields = {"name": data_set.name, "kind": data_set.kind, "n": len(data_set), **extra, "source": data_set.source}
    return f"{type(data_set).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


@dataclass(frozen=True)
class PromptSet:
    """Prompts of one kind with ids and categories.

    Attributes:
        name: the set's name in reports (``advbench``, ``xstest`` …).
        kind: ``harmful`` (ASR is measured) or ``safe`` (over-refusal is measured).
        prompts: the user requests.
        ids: one stable id per prompt (the upstream id where the set has one, else the 0-based row).
        categories: one category per prompt ("" where the set has none).
        source: hub id or local path it was read from.
        macro: the paper reports this set's ASR as the macro-average over categories (HarmfulQA,
            NicheHazardQA; paper-notes.md §4.1).
    """

    name: str
    kind: Literal["harmful", "safe"]
    prompts: tuple[str, ...]
    ids: tuple[str, ...]
    categories: tuple[str, ...]
    source: str
    macro: bool = False

    def __len__(self) -> int:
        return len(self.prompts)

    def __repr__(self) -> str:
        return _set_repr(self, categories=len(set(self.categories) - {""}))

    def subsample(self, n: int | None, seed: int = 0) -> "PromptSet":
        """A fixed random subset of ``n`` items in file order (all items when ``n`` is None or ≥ len)."""
        return _take(self, _sample(len(self), n, seed), ("prompts", "ids", "categories"))


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question.

    Attributes:
        id: stable id.
        question: the question text.
        choices: the answer options.
        labels: 1 for a true option, 0 for a false one (MMLU and MC1: exactly one 1; MC2: one or more).
        category: subject (MMLU) or "".
    """

    id: str
    question: str
    choices: tuple[str, ...]
    labels: tuple[int, ...]
    category: str = ""


@dataclass(frozen=True)
class MCSet:
    """A multiple-choice utility set scored by log-likelihood (paper-notes.md §4.5).

    Attributes:
        name: ``mmlu``, ``truthfulqa-mc1`` or ``truthfulqa-mc2``.
        scoring: ``letter`` (MMLU: the options are listed and the answer letter A-D is scored),
            ``mc1`` (the highest-likelihood option must be the true one) or ``mc2`` (normalised
            probability mass on the true options), as in lm-eval-harness.
        items: the questions.
        source: hub id or local path.
    """

    name: str
    scoring: Literal["letter", "mc1", "mc2"]
    items: tuple[MCItem, ...]
    source: str
    kind: Literal["mc"] = "mc"

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return _set_repr(self, scoring=self.scoring)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(item.id for item in self.items)

    def subsample(self, n: int | None, seed: int = 0) -> "MCSet":
        """A fixed random subset of ``n`` questions in file order."""
        return _take(self, _sample(len(self), n, seed), ("items",))


@dataclass(frozen=True)
class QASet:
    """Short-answer questions scored by exact match (the bundled QA set; SQuAD-style containment).

    Attributes:
        name: the set's name in reports.
        prompts: the questions.
        ids: one id per question.
        answers: accepted answers per question.
        source: where it was read from.
    """

    name: str
    prompts: tuple[str, ...]
    ids: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]
    source: str
    kind: Literal["qa"] = "qa"

    def __repr__(self) -> str:
        return _set_repr(self)

    def __len__(self) -> int:
        return len(self.prompts)

    def subsample(self, n: int | None, seed: int = 0) -> "QASet":
        """A fixed random subset of ``n`` questions in file order."""
        return _take(self, _sample(len(self), n, seed), ("prompts", "ids", "answers"))


def load_bundled_set(name: str, split: str = "test") -> PromptSet | QASet:
    """A bundled, project-written set as an evaluation set: ``harmful`` (ASR), ``safe`` (over-refusal), ``qa``.

    Args:
        name: ``harmful``, ``safe`` or ``qa`` (see :mod:`sa_lens.data`).
        split: ``train``, ``dev`` or ``test`` (default; the lab tunes on dev only).

    Raises:
        ValueError: an unknown name or split.
    """
    from sa_lens.data import load_bundled

    if name not in ("harmful", "safe", "qa"):
        raise InputError(f"bundled evaluation sets are harmful, safe and qa; got {name!r}.")
    rows = load_bundled(name, split)
    where = f"bundled:{name}/{split}"
    if name == "qa":
        return QASet("bundled-qa", tuple(r["question"] for r in rows), tuple(r["id"] for r in rows),
                     tuple(tuple(r["answers"]) for r in rows), where)
    cats = tuple(r["category"] if name == "harmful" else r["type"] for r in rows)
    return PromptSet(f"bundled-{name}", name, tuple(r["prompt"] for r in rows), tuple(r["id"] for r in rows), cats, where)  # type: ignore[arg-type]


def _take(obj: Any, keep: list[int], fields: Sequence[str]) -> Any:
    """A copy of a frozen set object keeping the rows ``keep`` of each per-item tuple field."""
    return replace(obj, **{f: tuple(getattr(obj, f)[i] for i in keep) for f in fields})


def _sample(size: int, n: int | None, seed: int) -> list[int]:
    if n is None or n >= size:
        return list(range(size))
    if n < 1:
        raise InputError(f"a subsample needs n ≥ 1, got {n}.")
    return sorted(random.Random(seed).sample(range(size), n))


@dataclass(frozen=True)
class PublicSource:
    """Where a public set lives and how its rows map to prompts.

    Attributes:
        name: registry name.
        kind: ``harmful``, ``safe`` or ``mc``.
        hub: ``(repo id, config or None, split)`` of the public hub copy, or None when there is none.
        files: upstream file names looked for in a local folder (``{split}`` is filled in).
        prompt_columns: candidate prompt columns, matched case-insensitively, first found wins.
        category_columns: candidate category columns ("" categories when none is found).
        id_columns: candidate id columns (the row number when none is found).
        keep: which rows of the source belong to this set (e.g. XSTest's safe half).
        build_prompt: the prompt from a row, when it is more than one column (HarmBench contextual).
        macro: report the macro-average ASR over categories.
        default_split: the split used when none is given.
        splits: the valid splits.
        folder: the folder name of its local copy under a data directory (default: the set's name).
    """

    name: str
    kind: Kind
    hub: tuple[str, str | None, str] | None
    files: tuple[str, ...]
    prompt_columns: tuple[str, ...] = ("prompt", "goal", "behavior", "question", "instruction", "text")
    category_columns: tuple[str, ...] = ("category",)
    id_columns: tuple[str, ...] = ()
    keep: Callable[[dict[str, Any]], bool] | None = None
    build_prompt: Callable[[dict[str, Any], str], str] | None = None
    macro: bool = False
    default_split: str | None = None
    splits: tuple[str, ...] = field(default=())
    folder: str = ""

    def local_folder(self, data_dir: str | os.PathLike[str]) -> Path:
        """Where this set's copy sits under a data directory laid out like ``../shared/data``."""
        return Path(data_dir) / (self.folder or self.name)


def _column(row_keys: Sequence[str], candidates: Sequence[str]) -> str | None:
    by_lower = {k.lower(): k for k in reversed(list(row_keys))}
    return next((by_lower[c.lower()] for c in candidates if c.lower() in by_lower), None)


def _get(row: dict[str, Any], name: str) -> Any:
    key = _column(list(row), [name])
    return row.get(key) if key is not None else None


def _xstest_label(want: str) -> Callable[[dict[str, Any]], bool]:
    return lambda row: str(_get(row, "label") or "").strip().lower() == want


HARMBENCH_CONTEXT_SEPARATOR = "\n\n---\n\n"
"""Between a HarmBench contextual item's context and its behaviour in the request (HarmBench's own layout); the
HarmBench classifier judge splits the request at its last occurrence to fill the contextual template."""


def _harmbench_prompt(row: dict[str, Any], behavior: str) -> str:
    # HarmBench's own prompt for contextual behaviours: the context, a rule, then the request. The upstream CSV
    # calls the context ContextString, the hub copy's contextual config calls it context.
    context = str(_get(row, "ContextString") or _get(row, "context") or "").strip()
    return f"{context}{HARMBENCH_CONTEXT_SEPARATOR}{behavior}" if context else behavior


def _not_copyright(row: dict[str, Any]) -> bool:
    # Copyright behaviours are judged by a hash check against the work, not by refusal or an LLM judge.
    return str(_get(row, "FunctionalCategory") or "").strip().lower() != "copyright"


PUBLIC_SETS: dict[str, PublicSource] = {
    s.name: s
    for s in (
        PublicSource("advbench", "harmful", ("walledai/AdvBench", None, "train"), ("harmful_behaviors.csv",)),
        PublicSource(
            "harmbench", "harmful", ("walledai/HarmBench", "standard", "train"),
            ("harmbench_behaviors_text_{split}.csv",), prompt_columns=("behavior", "prompt"),
            category_columns=("SemanticCategory", "category"), id_columns=("BehaviorID",),
            keep=_not_copyright, build_prompt=_harmbench_prompt, default_split="val", splits=("val", "test", "all"),
        ),
        PublicSource(
            "jbb-harmful", "harmful", ("JailbreakBench/JBB-Behaviors", "behaviors", "harmful"),
            ("harmful-behaviors.csv",), prompt_columns=("goal",), id_columns=("index",), folder="jbb-behaviors",
        ),
        PublicSource(
            "jbb-benign", "safe", ("JailbreakBench/JBB-Behaviors", "behaviors", "benign"),
            ("benign-behaviors.csv",), prompt_columns=("goal",), id_columns=("index",), folder="jbb-behaviors",
        ),
        PublicSource(
            "xstest", "safe", ("walledai/XSTest", None, "test"), ("xstest_prompts.csv",),
            category_columns=("type",), id_columns=("id",), keep=_xstest_label("safe"),
        ),
        PublicSource(
            "xstest-unsafe", "harmful", ("walledai/XSTest", None, "test"), ("xstest_prompts.csv",),
            category_columns=("type",), id_columns=("id",), keep=_xstest_label("unsafe"), folder="xstest",
        ),
        # DangerousQA ships as a JSON list of questions in declare-lab/red-instruct; no hub copy is known.
        PublicSource("dangerousqa", "harmful", None, ("dangerousqa.json", "harmful_questions/dangerousqa.json")),
        # CatQA: hub rows {Category, Subcategory, Question}; the authors' repository file (red-instruct's
        # harmful_questions/catqa_english.json) nests category → subcategory → questions.
        PublicSource(
            "catqa", "harmful", ("declare-lab/CategoricalHarmfulQA", None, "en"),
            ("catqa_english.json", "harmful_questions/catqa_english.json", "data/catqa_english.json"),
            category_columns=("Category",),
        ),
        # HarmfulQA: hub rows {id, topic, subtopic, question, …conversations}; the authors' question file
        # (red-instruct's harmful_questions/harmfulqs.json) nests topic → subtopic → questions.
        PublicSource(
            "harmfulqa", "harmful", ("declare-lab/HarmfulQA", None, "train"),
            ("data_for_hub.json", "harmfulqs.json", "harmful_questions/harmfulqs.json"),
            category_columns=("topic", "category"), id_columns=("id",), macro=True,
        ),
        # NicheHazardQA: rows {Question, Domain} in the authors' NICHEHAZARDQA.json, which is the hub copy.
        PublicSource(
            "nichehazardqa", "harmful", ("SoftMINER-Group/NicheHazardQA", None, "train"),
            ("NICHEHAZARDQA.json", "nichehazardqa.json", "harmful_questions/nichehazardqa.json"),
            category_columns=("Domain", "category", "topic"), macro=True,
        ),
        # HEx-PHI is gated on the hub and ships as headerless category_<k>.csv files; read from a folder.
        PublicSource("hex-phi", "harmful", None, ("category_*.csv",)),
        PublicSource(
            "strongreject", "harmful", ("walledai/StrongREJECT", None, "train"),
            ("strongreject_dataset.csv", "strongreject_dataset/strongreject_dataset.csv"),
            prompt_columns=("forbidden_prompt", "prompt"),
        ),
        PublicSource("mmlu", "mc", ("cais/mmlu", "all", "test"), ("{split}",), default_split="test", splits=("test", "dev")),
        PublicSource(
            "truthfulqa-mc1", "mc", ("truthfulqa/truthful_qa", "multiple_choice", "validation"),
            ("mc_task.json", "data/mc_task.json"),
            folder="truthfulqa",
        ),
        PublicSource(
            "truthfulqa-mc2", "mc", ("truthfulqa/truthful_qa", "multiple_choice", "validation"),
            ("mc_task.json", "data/mc_task.json"),
            folder="truthfulqa",
        ),
    )
}
"""Registry of public sets: name → where it lives and how its columns map."""

ALIASES: dict[str, tuple[str, ...]] = {
    "jbb": ("jbb-harmful", "jbb-benign"),
    "truthfulqa": ("truthfulqa-mc1", "truthfulqa-mc2"),
}
"""Names that stand for several sets."""


def resolve_names(names: Sequence[str]) -> list[str]:
    """Expand aliases (``jbb``, ``truthfulqa``) and lowercase names; unknown names pass through unchanged."""
    out: list[str] = []
    for name in names:
        out += ALIASES.get(name.lower(), (name.lower() if name.lower() in PUBLIC_SETS else name,))
    return list(dict.fromkeys(out))


def load_public(
    name: str,
    path: str | os.PathLike[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> PromptSet | MCSet:
    """Load a public benchmark by name, from the hub or from a local file or folder.

    Args:
        name: a key of :data:`PUBLIC_SETS` (case-insensitive): advbench, harmbench, jbb-harmful, jbb-benign,
            xstest (safe prompts), xstest-unsafe, dangerousqa, catqa, harmfulqa, nichehazardqa, hex-phi,
            strongreject, mmlu, truthfulqa-mc1, truthfulqa-mc2.
        path: a local copy: the upstream file, or a folder that holds it. None reads the hub copy.
        split: HarmBench ``val`` (default) / ``test`` / ``all`` (local files only: the hub copy holds the 200
            standard behaviours without splits); MMLU ``test`` (default) / ``dev``.
        limit: keep a fixed random subset of this many items (None keeps all).
        seed: seed of that subset.

    Returns:
        A :class:`PromptSet` (harm and over-refusal sets) or an :class:`MCSet` (utility sets).
        HarmBench keeps its standard and contextual behaviours (copyright ones need a hash-check judge).

    Raises:
        DataError: an unknown name, an unreachable hub (the message says how to pass ``path=``), a missing
            file, a malformed line (with its number), a missing prompt column, a file of the wrong kind
            (safe prompts loaded as a harmful set or the reverse), or no rows left.
        ValueError: an invalid split or limit.
    """
    key = name.lower()
    if key not in PUBLIC_SETS:
        hint = f" (did you mean {', '.join(ALIASES[key])}?)" if key in ALIASES else ""
        raise DataError(
            f"unknown data set {name!r}{hint}; known: {', '.join(PUBLIC_SETS)}. "
            "For your own file use sa_lens.data.public.load_public_file(path, kind=...)."
        )
    src = PUBLIC_SETS[key]
    if split is not None and split not in src.splits:
        raise InputError(f"{src.name} has no split {split!r}; valid: {', '.join(src.splits) or 'none (omit split)'}.")
    if path is None and split is not None and src.name == "harmbench":
        raise DataError(
            "the hub copy of HarmBench (walledai/HarmBench, standard behaviours) has no val/test split; pass the "
            f"upstream harmbench_behaviors_text_{split}.csv: load_public('harmbench', path=..., split={split!r})."
        )
    split = split or src.default_split
    if path is None:
        rows, where = _hub_rows(src, split), "hub:" + src.hub[0] if src.hub else ""
    else:
        rows, where = _local_rows(src, Path(path), split)
    loaded = _to_mc(src, rows, where) if src.kind == "mc" else _to_prompts(src, rows, where)
    return loaded.subsample(limit, seed)


def _hub_rows(src: PublicSource, split: str | None) -> list[dict[str, Any]]:
    local_hint = f"load_public({src.name!r}, path=<folder or file>) (CLI: --data {src.name}=PATH)"
    if src.hub is None:
        raise DataError(
            f"{src.name} has no public hub copy that sa_lens can read; download {src.files[0]!r} and pass it: {local_hint}."
        )
    repo, config, hub_split = src.hub
    if src.name == "mmlu" and split:
        hub_split = split
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"reading {src.name} from the hub needs the 'datasets' package (pip install 'sa_lens[hub]'); "
            f"or pass a local copy: {local_hint}."
        ) from exc
    try:
        ds = datasets.load_dataset(repo, config, split=hub_split)
    except Exception as exc:  # network, auth (gated sets), or a renamed hub copy: all end the same way
        raise DataError(
            f"could not read {src.name} from the Hugging Face hub ({repo}, config={config}, split={hub_split}): "
            f"{type(exc).__name__}: {str(exc)[:200]}. Offline or gated? Pass a local copy: {local_hint}."
        ) from exc
    return [dict(row) for row in ds]


def _local_rows(src: PublicSource, path: Path, split: str | None) -> tuple[list[dict[str, Any]], str]:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (for {src.name}). Check the path.")
    if src.name == "hex-phi":
        return _hex_phi_rows(path), str(path)
    if src.name == "mmlu":
        return _mmlu_rows(path, split or "test"), str(path)
    file = _find_file(src, path, split) if path.is_dir() else path
    _check_kind_by_name(src, file)
    if src.kind == "mc" and file.suffix.lower() != ".json":
        raise DataError(
            f"{file}: {src.name} reads the multiple-choice file mc_task.json (TruthfulQA's data/mc_task.json); "
            "TruthfulQA.csv is the generation task and has no MC1/MC2 options. Pass mc_task.json."
        )
    if src.kind == "mc":
        return _read_json_list(file), str(file)
    prompt_col = None if src.kind == "mc" else _file_prompt_column(src, file)
    return load_records(file, prompt_col), str(file)


def _find_file(src: PublicSource, folder: Path, split: str | None) -> Path:
    names = [f.format(split=split or "") for f in src.files]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no {' or '.join(map(repr, names))} for {src.name}; pass the file itself with path=.")


def _file_prompt_column(src: PublicSource, file: Path) -> str | None:
    # load_records matches one column case-insensitively; pick the first candidate the header has.
    try:
        with file.open(encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f)) if file.suffix.lower() == ".csv" else []
    except (OSError, StopIteration, UnicodeDecodeError, csv.Error):
        header = []
    if header:
        found = _column(header, src.prompt_columns)
        if found is None:
            raise DataError(
                f"{file}: no prompt column for {src.name} (looked for {', '.join(src.prompt_columns)}); "
                f"columns found: {', '.join(header)}. Rename the column or use load_public_file(path, column=...)."
            )
        return found
    return None


def _check_kind_by_name(src: PublicSource, file: Path) -> None:
    stem = file.stem.lower()
    if src.kind == "harmful" and ("benign" in stem or stem.startswith("safe")):
        raise DataError(f"{file}: the file name says safe/benign prompts, but {src.name} is a harmful set. "
                        "Load it as a safe set (e.g. 'jbb-benign') to measure over-refusal.")
    if src.kind == "safe" and "harmful" in stem:
        raise DataError(f"{file}: the file name says harmful prompts, but {src.name} is a safe set. "
                        "Load it as a harmful set (e.g. 'jbb-harmful') to measure ASR.")


def _read_json_list(file: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno}).") from exc
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{file}: expected a JSON list of objects.")
    return rows


def _hex_phi_rows(path: Path) -> list[dict[str, Any]]:
    files = sorted(path.glob("category_*.csv")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no category_<k>.csv files (HEx-PHI's layout); pass the folder that holds them.")
    rows = []
    for file in files:
        with file.open(encoding="utf-8-sig", newline="") as f:
            for lineno, fields in enumerate(csv.reader(f), start=1):
                if len(fields) != 1:
                    raise DataError(f"{file}: line {lineno} has {len(fields)} fields; HEx-PHI files hold one quoted prompt a line.")
                rows.append({"prompt": fields[0], "category": file.stem, "id": f"{file.stem}-{lineno}"})
    return rows


def _mmlu_rows(path: Path, split: str) -> list[dict[str, Any]]:
    # The authors' tarball unpacks to data/{dev,test}/<subject>_<split>.csv.
    folder = next((f for f in (path / split, path / "data" / split) if f.is_dir()), path)
    files = sorted(folder.glob("*.csv")) if folder.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no MMLU CSV files (expected {split}/<subject>_{split}.csv).")
    rows = []
    for file in files:
        subject = file.stem.removesuffix(f"_{split}")
        for i, row in enumerate(_mmlu_file_rows(file)):
            rows.append({**row, "subject": row.get("subject") or subject, "id": f"{subject}-{i}"})
    return rows


_MMLU_HEADER = ("question", "choice0", "choice1", "choice2", "choice3", "answer")


def _mmlu_file_rows(file: Path) -> list[dict[str, Any]]:
    """Rows of one MMLU subject file: the authors' headerless ``question,A,B,C,D,letter`` or a headed copy."""
    try:
        with file.open(encoding="utf-8-sig", newline="") as f:
            records = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{file}: cannot read this MMLU file as UTF-8 CSV ({exc}).") from exc
    if records and "question" in (c.strip().lower() for c in records[0]):
        return load_records(file, "question")  # a reformatted copy with a header (e.g. choice0..3, answer 0-3)
    rows = []
    for lineno, fields in enumerate(records, start=1):
        if len(fields) != len(_MMLU_HEADER):
            raise DataError(
                f"{file}: line {lineno} has {len(fields)} fields; the authors' MMLU files hold question, the four "
                "options and the answer letter (6 fields, no header). Quote fields that contain commas."
            )
        rows.append(dict(zip(_MMLU_HEADER, fields, strict=True)))
    return rows


def _label_check(src: PublicSource, rows: list[dict[str, Any]], where: str) -> None:
    """Refuse a file whose own labels contradict the set's kind (XSTest passed as a harmful set …)."""
    if src.keep is not None or not rows or _column(list(rows[0]), ["label"]) is None:
        return
    labels = {str(_get(r, "label")).strip().lower() for r in rows}
    wrong = "safe" if src.kind == "harmful" else "unsafe"
    if wrong in labels:
        raise DataError(
            f"{where}: rows are labelled '{wrong}', but {src.name} is a {src.kind} set — this looks like XSTest. "
            "Load it as 'xstest' (its safe prompts) or 'xstest-unsafe' (its unsafe ones)."
        )


def _to_prompts(src: PublicSource, rows: list[dict[str, Any]], where: str) -> PromptSet:
    _label_check(src, rows, where)
    if src.keep is not None:
        rows = [r for r in rows if src.keep(r)]
    if not rows:
        raise DataError(f"{where}: no {src.kind} rows for {src.name} (check that this is the right file).")
    keys = list(dict.fromkeys(k for r in rows[:50] for k in r))
    prompt_col = _column(keys, src.prompt_columns)
    if prompt_col is None:
        raise DataError(
            f"{where}: no prompt column for {src.name} (looked for {', '.join(src.prompt_columns)}); "
            f"columns found: {', '.join(keys)}."
        )
    cat_col = _column(keys, src.category_columns)
    id_col = _column(keys, src.id_columns) if src.id_columns else None
    prompts, ids, cats = [], [], []
    for i, row in enumerate(rows):
        text = str(row.get(prompt_col) or "").strip()
        if not text:
            raise DataError(f"{where}: row {i + 1}: column {prompt_col!r} is empty. Fill in or delete that row.")
        prompts.append(src.build_prompt(row, text) if src.build_prompt else text)
        ids.append(str(row[id_col]) if id_col and row.get(id_col) not in (None, "") else str(row.get("id", i)))
        cats.append(str(row.get(cat_col) or "") if cat_col else "")
    if len(set(ids)) != len(ids):
        ids = [str(i) for i in range(len(rows))]  # upstream ids clash (several files merged): rows are unique
    return PromptSet(src.name, src.kind, tuple(prompts), tuple(ids), tuple(cats), where, src.macro)  # type: ignore[arg-type]


def _to_mc(src: PublicSource, rows: list[dict[str, Any]], where: str) -> MCSet:
    items = []
    for i, row in enumerate(rows):
        try:
            items.append(_mmlu_item(row, i) if src.name == "mmlu" else _truthfulqa_item(row, i, src.name[-3:]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: item {i + 1} of {src.name} is malformed ({exc}).") from exc
    if not items:
        raise DataError(f"{where}: no questions for {src.name}.")
    scoring = "letter" if src.name == "mmlu" else src.name[-3:]
    return MCSet(src.name, scoring, tuple(items), where)  # type: ignore[arg-type]


_MMLU_LETTERS = "ABCD"  # one letter each: "" or "AB" is no answer (a substring test read both as A)


def _mmlu_item(row: dict[str, Any], i: int) -> MCItem:
    if _get(row, "choices") is not None:  # hub layout: choices list, answer index
        raw = list(_get(row, "choices"))
    else:  # the local copy's layout: choice0..choice3
        raw = [_get(row, f"choice{k}") for k in range(4)]
    if any(c is None for c in raw):
        raise InputError(f"missing choice in {raw!r}")
    choices = tuple(str(c) for c in raw)
    answer = _get(row, "answer")
    letters = tuple(_MMLU_LETTERS)
    letter = answer.strip().upper() if isinstance(answer, str) else None
    if letter in letters:
        index = letters.index(letter)
    elif isinstance(answer, int) or (letter or "").isdigit():
        index = int(answer)
    else:
        raise InputError(f"answer {answer!r} is neither a letter A-{letters[len(choices) - 1]} nor an index from 0")
    if not 0 <= index < len(choices):
        raise InputError(f"answer {answer!r} out of range")
    labels = tuple(int(k == index) for k in range(len(choices)))
    subject = str(_get(row, "subject") or "")
    return MCItem(str(row.get("id", i)), str(_get(row, "question")), choices, labels, subject)


def _truthfulqa_item(row: dict[str, Any], i: int, which: str) -> MCItem:
    targets = row[f"{which}_targets"]
    if isinstance(targets, dict) and "choices" in targets:  # hub layout
        choices, labels = tuple(targets["choices"]), tuple(int(x) for x in targets["labels"])
    else:  # mc_task.json layout: {option: 0/1}
        choices, labels = tuple(targets), tuple(int(v) for v in targets.values())
    if not any(labels):
        raise InputError("no true option")
    return MCItem(str(i), str(row["question"]), choices, labels)


def load_public_file(
    path: str | os.PathLike[str],
    kind: Literal["harmful", "safe"],
    column: str | None = None,
    category_column: str | None = None,
    name: str | None = None,
    macro: bool = False,
) -> PromptSet:
    """Load your own prompt file (CSV, JSON, JSONL) as a harmful or safe set.

    Args:
        path: the file.
        kind: ``harmful`` (ASR) or ``safe`` (over-refusal).
        column: the prompt column (case-insensitive); None tries prompt, goal, behavior, question,
            instruction, text.
        category_column: the category column (case-insensitive), or None for "category" if present.
        name: the set's name in reports (default: the file stem).
        macro: report the macro-average ASR over categories.

    Raises:
        DataError: see :func:`load_public`.
    """
    path = Path(path)
    src = PublicSource(
        name or path.stem, kind, None, (), category_columns=(category_column or "category",), id_columns=("id",), macro=macro
    )
    _check_kind_by_name(src, path)
    # load_records puts the chosen column under "prompt" (and reports malformed lines by number).
    return _to_prompts(replace(src, prompt_columns=("prompt",)), load_records(path, column), str(path))
