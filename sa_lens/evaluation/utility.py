"""Utility as lm-eval-harness measures it (MMLU 5-shot, TruthfulQA MC1/MC2, ARC, HellaSwag), on a model in any state.

The paper reports utility of BASE models as MMLU (5-shot), TruthfulQA, HellaSwag and ARC with lm-eval-harness
conventions (paper-notes.md §4.5). :func:`utility` runs lm-eval's own tasks through lm-eval's own ``HFLM`` wrapped
around the model's Hugging Face module — for a bridge, ``bridge.original_model``, whose submodules are the bridge's
components, so the hooks and in-place edits of an :class:`~sa_lens.interventions.Intervention` applied around the
run act on every forward pass; bridge components no hook needs run as the modules they wrap
(:func:`sa_lens.bypass.bypass_unhooked`, Hugging Face's speed and attention). ``engine="builtin"`` runs the same
MMLU and TruthfulQA prompts through :mod:`sa_lens.evaluation.multiple_choice` instead (no task machinery, same
numbers; ``analyses/utility_parity.py``).

Data: with ``data_dir`` MMLU and TruthfulQA are read from local copies laid out like ``../shared/data``
(``mmlu/{dev,test}/<subject>_{split}.csv``, ``truthfulqa/mc_task.json``) and handed to lm-eval's task configs
in place of their hub download; ARC and HellaSwag (and both others without ``data_dir``) come from the Hugging
Face hub as lm-eval configures them, so offline they need a filled hub cache.

Example:
    >>> report = utility(model, ["mmlu", "truthfulqa"], data_dir="data", limit=20, state=HarmRemoval(hv, lam=3))
    >>> report.tasks["mmlu"]["acc"]           # Rate: mean and seeded bootstrap 95 % interval
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sa_lens.bridge import is_bridge
from sa_lens.bypass import bypass_unhooked
from sa_lens.data import DataError
from sa_lens.data.public import PUBLIC_SETS, MCItem, MCSet, load_public
from sa_lens.errors import InputError
from sa_lens.evaluation.bootstrap import Rate, bootstrap_mean
from sa_lens.evaluation.multiple_choice import item_logprobs, mmlu_shots, score_of
from sa_lens.generation import hf_and_tokenizer
from sa_lens.provenance import model_name

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from sa_lens.interventions import Intervention

__all__ = ["DEFAULT_FEWSHOT", "TASK_ALIASES", "UtilityReport", "parity", "utility"]

DEFAULT_FEWSHOT: dict[str, int] = {
    "mmlu": 5, "truthfulqa_mc1": 0, "truthfulqa_mc2": 0, "arc_easy": 25, "arc_challenge": 25, "hellaswag": 10,
}
"""Shots per task: MMLU 5 (the paper); the rest as the Open LLM Leaderboard v1, whose numbers the paper's match
(paper-notes.md §4.5). TruthfulQA's six-pair primer is part of its prompt, so lm-eval pins its shots at 0."""

TASK_ALIASES: dict[str, tuple[str, ...]] = {"truthfulqa": ("truthfulqa_mc1", "truthfulqa_mc2"), "arc": ("arc_challenge",)}
"""Names that stand for several lm-eval tasks (``arc`` is ARC-Challenge, the set the paper's peers report)."""

_SCORING = {"mmlu": "letter", "truthfulqa_mc1": "mc1", "truthfulqa_mc2": "mc2"}  # the tasks the built-in scorer has
_FEWSHOT_SEED = 1234  # lm-eval's simple_evaluate default (DEFAULT_OTHER_SEED) for tasks that sample their shots


@dataclass(frozen=True)
class UtilityReport:
    """What :func:`utility` measured.

    Attributes:
        tasks: task → metric → :class:`Rate` (mean over items with a seeded percentile-bootstrap 95 % interval,
            n items). Metrics are lm-eval's per-item ones: ``acc`` (MMLU, MC1: 1/0; MC2: the true-probability
            mass) and, where lm-eval reports it, ``acc_norm`` (ARC, HellaSwag: length-normalised). MMLU is the
            mean over all its items (lm-eval's ``mmlu`` group, weighted by size).
        items: one JSON-able record per question: ``task``, ``subtask`` (lm-eval's leaf task), ``id`` (MMLU
            ``<subject>-<k>``, else the 0-based document index), ``loglikelihoods`` (nats, one per option),
            ``labels`` (1 = true option) and ``scores`` (metric → value).
        config: what was run: engine, model name, state and its fingerprint, tasks, shots, limit, BOS handling,
            lm-eval version, seconds.
    """

    tasks: dict[str, dict[str, Rate]]
    items: tuple[dict[str, Any], ...]
    config: dict[str, Any]

    def __getitem__(self, task: str) -> float:
        """The headline value of ``task`` (``acc``)."""
        return self.tasks[task]["acc"].value


def _resolve_tasks(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str) or not tasks:
        raise InputError(f"tasks must be a non-empty list of task names, e.g. ['mmlu', 'truthfulqa']; got {tasks!r}.")
    out: list[str] = []
    for name in tasks:
        out += TASK_ALIASES.get(name.lower(), (name.lower(),))
    return list(dict.fromkeys(out))


def _shots_per_task(tasks: list[str], num_fewshot: int | Mapping[str, int] | None) -> dict[str, int]:
    if isinstance(num_fewshot, Mapping):
        unknown = sorted(set(num_fewshot) - set(tasks))
        if unknown:
            raise InputError(f"num_fewshot names tasks not run: {', '.join(unknown)}; tasks are {', '.join(tasks)}.")
        wanted = {t: num_fewshot.get(t, DEFAULT_FEWSHOT.get(t, 0)) for t in tasks}
    elif num_fewshot is None:
        wanted = {t: DEFAULT_FEWSHOT.get(t, 0) for t in tasks}
    else:  # one number for every task but TruthfulQA, as lm-eval's simple_evaluate leaves a pinned 0 alone
        wanted = {t: 0 if t.startswith("truthfulqa") else num_fewshot for t in tasks}
    for task, k in wanted.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InputError(f"num_fewshot for {task} must be an integer ≥ 0, got {k!r}.")
        if task.startswith("truthfulqa") and k:
            raise InputError(f"{task} takes 0 shots: its six-pair QA primer is its few-shot prompt (lm-eval pins 0).")
    return wanted


def _local_sets(task: str, data_dir: Path) -> tuple[MCSet, MCSet | None]:
    """The local copy of an MMLU (test, dev) or TruthfulQA (set, None) task, read by sa_lens's loaders."""
    if task == "mmlu":
        folder = PUBLIC_SETS["mmlu"].local_folder(data_dir)
        test, dev = load_public("mmlu", folder, split="test"), load_public("mmlu", folder, split="dev")
        return test, dev  # type: ignore[return-value]
    name = task.replace("_", "-")
    return load_public(name, PUBLIC_SETS[name].local_folder(data_dir)), None  # type: ignore[return-value]


def _first_per_group(items: Sequence[MCItem], limit: int | None) -> list[MCItem]:
    """lm-eval's ``limit``: the first ``limit`` documents of each leaf task (each MMLU subject)."""
    if limit is None:
        return list(items)
    seen: dict[str, int] = {}
    out = []
    for item in items:
        seen[item.category] = seen.get(item.category, 0) + 1
        if seen[item.category] <= limit:
            out.append(item)
    return out


def _record(task: str, subtask: str, item_id: str, lls: Sequence[float], labels: Sequence[int],
            scores: Mapping[str, float]) -> dict[str, Any]:
    return {"task": task, "subtask": subtask, "id": item_id, "loglikelihoods": [float(x) for x in lls],
            "labels": [int(x) for x in labels], "scores": {k: float(v) for k, v in scores.items()}}


# ---- engine: the built-in scorer ---------------------------------------------------------------------------


def _builtin_items(model: Any, tokenizer: Any, task: str, shots: int, data_dir: Path | None, limit: int | None,
                   batch_size: int, add_bos_token: bool | None) -> list[dict[str, Any]]:
    if task not in _SCORING:
        raise InputError(f"the built-in scorer has {', '.join(_SCORING)}; run {task} with engine='lm_eval'.")
    if data_dir is not None:
        data, dev = _local_sets(task, data_dir)
    else:
        name = task.replace("_", "-")
        data = load_public(name)  # type: ignore[assignment]
        dev = load_public("mmlu", split="dev") if task == "mmlu" else None  # type: ignore[assignment]
    items = _first_per_group(data.items, limit)
    by_subject = mmlu_shots(dev, shots) if dev is not None else None
    lls = item_logprobs(model, data.scoring, items, tokenizer, batch_size, by_subject, add_bos_token)
    return [_record(task, f"mmlu_{it.category}" if task == "mmlu" else task, it.id, ll.tolist(), it.labels,
                    {"acc": score_of(data.scoring, ll, it.labels)}) for it, ll in zip(items, lls)]


# ---- engine: lm-eval ---------------------------------------------------------------------------------------


_LOCAL_TASK_FOLDERS = ("mmlu/default", "truthfulqa")
"""lm-eval's folders (under ``lm_eval/tasks``) holding the configs of the tasks read from local copies."""


@functools.cache
def _task_manager(local_only: bool = False) -> Any:
    """lm-eval's task index, built once per process. All of lm-eval's task YAMLs take ~25 s to index on 2 CPU
    cores; a run that reads only local MMLU / TruthfulQA copies needs the configs of their two folders (~40 ms)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if not local_only:
        return TaskManager()
    tasks = Path(lm_eval.__file__).parent / "tasks"
    return TaskManager(include_path=[str(tasks / f) for f in _LOCAL_TASK_FOLDERS], include_defaults=False)


def _lm_eval_config(name: str) -> dict[str, Any]:
    """lm-eval's own config of a leaf task (prompt, shots, metrics), ``include`` and ``!function`` resolved."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = _task_manager(local_only=True).task_index.get(name)
    if entry is None or entry.yaml_path is None:  # a lm-eval that keeps the task elsewhere: the whole index
        entry = _task_manager().task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise InputError(f"lm-eval {_lm_eval_version()} has no task {name!r}.")
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    cfg.pop("include", None)
    return cfg


def _mmlu_rows(items: Sequence[MCItem]) -> list[dict[str, Any]]:
    # The hub copy's layout (cais/mmlu), which lm-eval's MMLU prompt reads.
    return [{"question": it.question, "subject": it.category, "choices": list(it.choices),
             "answer": it.labels.index(1)} for it in items]


def _local_task_configs(task: str, data_dir: Path) -> list[dict[str, Any]]:
    """lm-eval's configs of ``task`` with the local copy handed over in place of the hub download."""
    import datasets

    data, dev = _local_sets(task, data_dir)
    if task != "mmlu":
        # The hub copy's layout (truthfulqa/truthful_qa, multiple_choice): mc1_targets / mc2_targets per question.
        key = f"{data.scoring}_targets"
        split = datasets.Dataset.from_list(
            [{"question": it.question, key: {"choices": list(it.choices), "labels": list(it.labels)}} for it in data.items]
        )
        return [{**_lm_eval_config(task), "custom_dataset": lambda **_: {"validation": split}}]
    assert dev is not None
    configs = []
    for subject in dict.fromkeys(it.category for it in data.items):
        test_rows = _mmlu_rows([it for it in data.items if it.category == subject])
        dev_rows = _mmlu_rows([it for it in dev.items if it.category == subject])
        splits = {"test": datasets.Dataset.from_list(test_rows), "dev": datasets.Dataset.from_list(dev_rows)}
        configs.append({**_lm_eval_config(f"mmlu_{subject}"), "custom_dataset": lambda _s=splits, **_: _s})
    return configs


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _owner(leaf: str, tasks: list[str]) -> str:
    return "mmlu" if leaf.startswith("mmlu_") and "mmlu" in tasks else leaf


def _lm_eval_items(model: Any, tokenizer: Any, tasks: list[str], shots: dict[str, int], data_dir: Path | None,
                   limit: int | None, batch_size: int, add_bos_token: bool | None,
                   state: Intervention | None) -> list[dict[str, Any]]:
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    specs: list[Any] = []
    for task in tasks:
        local = data_dir is not None and task in _SCORING
        specs += _local_task_configs(task, data_dir) if local else [task]  # type: ignore[arg-type]
    try:
        loaded = _task_manager(local_only=all(isinstance(s, dict) for s in specs)).load(specs)
    except KeyError as exc:
        raise InputError(f"lm-eval {_lm_eval_version()} does not know a task of {tasks}: {exc}.") from exc
    except Exception as exc:  # the hub unreachable, a gated set, a missing cache: every one ends the same way
        raise DataError(
            f"lm-eval could not load {tasks}: {type(exc).__name__}: {str(exc)[:300]}. Offline? MMLU and TruthfulQA "
            "read a local copy with data_dir=...; other tasks need the Hugging Face hub or its cache."
        ) from exc
    for leaf, task_obj in loaded["tasks"].items():
        task_obj.set_config(key="num_fewshot", value=shots.get(_owner(leaf, tasks), 0))
        task_obj.set_fewshot_seed(seed=_FEWSHOT_SEED)
    hf, tok = hf_and_tokenizer(model, tokenizer)
    pad = tok.pad_token  # HFLM gives a tokenizer without one the UNK or EOS token as padding: undone below
    try:
        lm = HFLM(pretrained=hf, tokenizer=tok, batch_size=batch_size, add_bos_token=add_bos_token,
                  device=str(hf.device))
        # The state's hooks go in first, so the bypass keeps the components they need (sa_lens.bypass).
        with contextlib.ExitStack() as stack:
            if state is not None:
                stack.enter_context(state.apply(model))
            if is_bridge(model):
                stack.enter_context(bypass_unhooked(model))
            out = evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=True)
    finally:
        tok.pad_token = pad
    records = []
    for leaf, samples in out["samples"].items():
        for s in sorted(samples, key=lambda s: s["doc_id"]):
            lls = [resp[0] for resp in s["filtered_resps"]]
            if leaf == "truthfulqa_mc2":
                labels = list(s["doc"]["mc2_targets"]["labels"])
            else:
                labels = [int(k == s["target"]) for k in range(len(lls))]
            item_id = f"{leaf.removeprefix('mmlu_')}-{s['doc_id']}" if leaf.startswith("mmlu_") else str(s["doc_id"])
            scores = {m: s[m] for m in ("acc", "acc_norm") if m in s}
            records.append(_record(_owner(leaf, tasks), leaf, item_id, lls, labels, scores))
    return records


def utility(
    model: TransformerBridge | PreTrainedModel,
    tasks: Sequence[str] = ("mmlu", "truthfulqa"),
    num_fewshot: int | Mapping[str, int] | None = None,
    state: Intervention | None = None,
    limit: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    add_bos_token: bool | None = None,
    engine: Literal["lm_eval", "builtin"] = "lm_eval",
    n_boot: int = 2000,
) -> UtilityReport:
    """Multiple-choice utility with lm-eval-harness's tasks, prompts and scoring, on a model in ``state``.

    Args:
        model: a bridge or a plain HF causal LM (then pass ``tokenizer``).
        tasks: ``mmlu``, ``truthfulqa_mc1``, ``truthfulqa_mc2`` (``truthfulqa`` = both), ``arc_easy``,
            ``arc_challenge`` (``arc``), ``hellaswag``, or any other lm-eval multiple-choice task (lm_eval engine).
        num_fewshot: shots per task; None = :data:`DEFAULT_FEWSHOT` (MMLU 5 as the paper); one int for every task
            but TruthfulQA (0: its primer is its few-shot prompt); or task → shots.
        state: an intervention applied around the whole run (``with state.apply(model)``); needs a bridge.
        limit: the first ``limit`` questions of each task — of each MMLU subject (lm-eval's ``limit``); None = all.
        data_dir: a folder holding ``mmlu/`` and ``truthfulqa/`` copies (see the module docstring); None reads the
            hub. ARC and HellaSwag always come from the hub.
        batch_size: inputs per forward pass.
        tokenizer: required for a plain HF model; overrides a bridge's.
        add_bos_token: None = the tokenizer's own special tokens (lm-eval's default). On a bridge loaded by
            :func:`sa_lens.load_model` that is the checkpoint's own tokenizer, not TransformerLens's copy that
            always adds a BOS, so the run reads what ``lm_eval --model hf`` reads; True/False forces it.
        engine: ``lm_eval`` (lm-eval's ``HFLM`` and task configs) or ``builtin`` (MMLU and TruthfulQA through
            :mod:`sa_lens.evaluation.multiple_choice`; same prompts and tokens, one process, no task machinery).
        n_boot: bootstrap resamples of each interval (≥ 100).

    Returns:
        A :class:`UtilityReport`: per task and metric a :class:`Rate` (seeded bootstrap 95 % interval), per item
        the options' log-likelihoods.

    Raises:
        InputError: no tasks, bad shots or limit, a state on a plain HF model, a task the engine lacks, a state
            that does not fit the model; ``DataError`` (an InputError) for missing local files or an unreachable hub.
        ImportError: the lm_eval engine without lm-eval installed (``pip install 'sa_lens[utility]'``).
    """
    names = _resolve_tasks(tasks)
    shots = _shots_per_task(names, num_fewshot)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive integer (questions per task or MMLU subject) or None; got {limit!r}.")
    if engine not in ("lm_eval", "builtin"):
        raise InputError(f"engine must be 'lm_eval' or 'builtin'; got {engine!r}.")
    if state is not None:
        if not is_bridge(model):
            raise InputError("a state (intervention) applies to a TransformerBridge; load the model with "
                             "sa_lens.load_model, or pass state=None for a plain HF model.")
        state.check(model)
    folder = Path(data_dir) if data_dir is not None else None
    start = time.perf_counter()
    if engine == "lm_eval":
        try:
            import lm_eval  # noqa: F401  (the optional extra, checked before any work)
        except ImportError as exc:
            raise ImportError("engine='lm_eval' needs lm-eval: pip install 'sa_lens[utility]'.") from exc
        records = _lm_eval_items(model, tokenizer, names, shots, folder, limit, batch_size, add_bos_token, state)
    else:
        with state.apply(model) if state is not None else contextlib.nullcontext():
            records = [r for t in names
                       for r in _builtin_items(model, tokenizer, t, shots[t], folder, limit, batch_size, add_bos_token)]
    seconds = time.perf_counter() - start
    table: dict[str, dict[str, Rate]] = {}
    for task in names:
        rows = [r for r in records if r["task"] == task]
        if not rows:
            raise InputError(f"{task} gave no items (an lm-eval group name other than mmlu? name its leaf tasks).")
        table[task] = {m: bootstrap_mean([r["scores"][m] for r in rows], n_boot=n_boot) for m in rows[0]["scores"]}
    config = {
        "engine": engine, "model": model_name(model), "state": None if state is None else state.name,
        "state_fingerprint": None if state is None else state.fingerprint(), "tasks": names, "num_fewshot": shots,
        "limit": limit, "add_bos_token": add_bos_token, "chat_template": False,
        "lm_eval": _lm_eval_version() if engine == "lm_eval" else None, "seconds": round(seconds, 1),
    }
    return UtilityReport(table, tuple(records), config)


def parity(a: UtilityReport, b: UtilityReport) -> dict[str, dict[str, Any]]:
    """How far two runs of the same items lie apart (the built-in engine against lm-eval's, say), per task.

    Args:
        a, b: reports over the same tasks and questions.

    Returns:
        task → ``n`` (questions), ``max_abs_delta`` (largest |Δ| of an option's log-likelihood, nats),
        ``score_disagreements`` (questions whose ``acc`` differs by more than 1e-6), ``acc_a``, ``acc_b``.

    Raises:
        InputError: the reports do not hold the same questions with the same options and labels.
    """
    rows_a = {(r["subtask"], r["id"]): r for r in a.items}
    rows_b = {(r["subtask"], r["id"]): r for r in b.items}
    if rows_a.keys() != rows_b.keys():
        raise InputError(f"the reports hold different questions ({len(rows_a.keys() ^ rows_b.keys())} in one only).")
    out: dict[str, dict[str, Any]] = {}
    for key, ra in rows_a.items():
        rb = rows_b[key]
        if ra["labels"] != rb["labels"]:
            raise InputError(f"{key}: the reports' options or labels differ ({ra['labels']} vs {rb['labels']}).")
        entry = out.setdefault(ra["task"], {"n": 0, "max_abs_delta": 0.0, "score_disagreements": 0})
        deltas = [abs(x - y) for x, y in zip(ra["loglikelihoods"], rb["loglikelihoods"])]
        entry["n"] += 1
        entry["max_abs_delta"] = max(entry["max_abs_delta"], *deltas)
        entry["score_disagreements"] += abs(ra["scores"]["acc"] - rb["scores"]["acc"]) > 1e-6
    for task, entry in out.items():
        entry["acc_a"], entry["acc_b"] = a[task], b[task]
    return out
