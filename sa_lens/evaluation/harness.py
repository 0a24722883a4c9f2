"""``sa_lens.evaluate``: the one engine for ASR, over-refusal and utility of any model states, resumable.

Each model state is an intervention (:mod:`sa_lens.interventions`: Original, HDR, Safe-Align, Safety
Arithmetic, ablations, …). For each state, each data set is run in fixed batches: generate (decoding preset,
prompt format), judge (the harm judge on harmful sets, the XSTest-style over-refusal judge on safe sets) or
score options by log-likelihood (multiple choice), and append the batch's records to ``results.jsonl``. A
rerun skips every item whose key (state, data set, item id, configuration: model, the intervention's
fingerprint — every parameter, vectors by content —, a hash of the weights in that state, decoding, judge)
is already there with the same item content (a digest of the prompt, or of the question, options and
labels) and generated in the same batch (the batch's items and position, which fix its sampling seed).
Batches group items of similar length (less padding) and are fixed by the data set's content and
``batch_size``, so an interrupted and resumed run gives the same records as an uninterrupted one; a changed
batch size or a grown data set redoes the items whose batch changed.

Intervals: every value carries a seeded percentile-bootstrap 95 % interval (:mod:`sa_lens.evaluation.bootstrap`)
— one method for proportions, macro-averages over categories and MC2's continuous scores alike, where a
binomial interval (Wilson) would cover only the first.
Source: paper-notes.md §4 (protocol), design.md §3 (judging rules).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sa_lens.data import DataError
from sa_lens.data.public import (
    PUBLIC_SETS,
    MCItem,
    MCSet,
    PromptSet,
    QASet,
    load_bundled_set,
    load_public,
    resolve_names,
)
from sa_lens.errors import InputError
from sa_lens.evaluation.backends import Backend, get_backend
from sa_lens.evaluation.decoding import GenerationSettings, preset
from sa_lens.evaluation.distributed import Shard, merge, open_store
from sa_lens.evaluation.judge_registry import Judge, get_judge
from sa_lens.evaluation.judges import Verdict, judge_nonblank
from sa_lens.evaluation.metrics import exact_match
from sa_lens.evaluation.multiple_choice import MMLU_SHOTS, mmlu_shots, score_items
from sa_lens.evaluation.over_refusal import OverRefusalJudge, RefusalClass
from sa_lens.evaluation.report import SOURCES_MACRO, comparison_table, summarize, summary_table
from sa_lens.evaluation.store import ResultStore, record_key
from sa_lens.fingerprint import state_fingerprint
from sa_lens.interventions import Compose, Intervention
from sa_lens.lens import SafetyLens
from sa_lens.provenance import model_name, portable_name

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["EvalReport", "evaluate", "load_sets", "state_fingerprint"]

DataSpec = str | PromptSet | MCSet | QASet
EvalSet = PromptSet | MCSet | QASet


@dataclass
class EvalReport:
    """What :func:`evaluate` measured.

    Attributes:
        rows: one dict per (state, data set): headline metric, bootstrap 95 % interval, n, failures
            (see :func:`sa_lens.evaluation.report.summarize`); values are fractions in [0, 1].
        records: every per-item record (prompt, response, verdict or score).
        summary: Markdown table of ``rows``.
        comparison: Markdown table in the paper's layout (states × data sets, %).
        out_dir: the report folder, or None when nothing was written.
        seconds: wall time of this call.
        config: what was run (model, judges, decoding, states and their fingerprints, data sets with kind, n and
            source, limit, seeds, ``items_run`` = items generated or scored by this call); saved in results.json.
    """

    rows: list[dict]
    records: list[dict]
    summary: str
    comparison: str
    out_dir: Path | None = None
    seconds: float = 0.0
    config: dict = field(default_factory=dict)


def load_sets(
    datasets: Sequence[DataSpec],
    data_paths: Mapping[str, str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> list[EvalSet]:
    """Resolve data set specs: names (``advbench``; aliases ``jbb``, ``truthfulqa``; ``bundled-harmful``,
    ``bundled-safe``, ``bundled-qa`` for the test split of the bundled sets), ``name=PATH``, or loaded sets.

    Args:
        datasets: the specs.
        data_paths: name → local file or folder for names given without ``=PATH``; a name missing here
            is read from the hub.
        limit: keep a fixed random subset of this many items per set.
        seed: seed of that subset.
        data_dir: a folder laid out like ``../shared/data`` (``advbench/``, ``jbb-behaviors/`` …), used for
            names that have no path of their own; None reads those from the hub.

    Raises:
        DataError: see :func:`sa_lens.data.public.load_public`; also two sets of one name, a set named
            :data:`~sa_lens.evaluation.report.SOURCES_MACRO`, or item ids that
            repeat within a set (results are keyed by id).
    """
    out: list[EvalSet] = []
    paths = {k.lower(): v for k, v in (data_paths or {}).items()}
    for spec in datasets:
        if not isinstance(spec, str):
            out.append(spec.subsample(limit, seed))
            continue
        name, _, path = spec.partition("=")
        if name.strip().lower().startswith("bundled-"):
            out.append(load_bundled_set(name.strip().lower().removeprefix("bundled-")).subsample(limit, seed))
            continue
        for resolved in resolve_names([name.strip()]):
            where = path.strip() or paths.get(resolved) or paths.get(name.strip().lower())
            if not where and data_dir is not None and resolved in PUBLIC_SETS:
                folder = PUBLIC_SETS[resolved].local_folder(data_dir)
                if not folder.exists():
                    raise DataError(
                        f"the data folder {data_dir} has no {folder.name}/ for {resolved} (data_dir, CLI --data-dir); "
                        f"put a copy there, or pass it as {resolved}=PATH."
                    )
                where = str(folder)
            out.append(load_public(resolved, where or None, limit=limit, seed=seed))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise DataError(f"data set names repeat ({', '.join(names)}); each set needs its own name in the report.")
    if SOURCES_MACRO in names:  # the report's row averaging harm sources has that name; a set would hide behind it
        raise DataError(f"a data set is named {SOURCES_MACRO!r}, the name of the report's mean over harm sources; "
                        "rename the set (PromptSet(name=...) or name=PATH).")
    for s in out:
        seen: set[str] = set()
        twice = [i for i in s.ids if i in seen or seen.add(i)]
        if twice:
            raise DataError(
                f"item ids repeat in {s.name} ({', '.join(map(repr, twice[:5]))}); results are keyed by id, so "
                "each item needs its own."
            )
    return out


def _item_digest(s: EvalSet, i: int) -> str:
    """A short hash of what item ``i`` asks (prompt; MC question, options and labels; QA answers)."""
    if isinstance(s, MCSet):
        it = s.items[i]
        content: list = [it.question, list(it.choices), list(it.labels)]
    elif isinstance(s, QASet):
        content = [s.prompts[i], list(s.answers[i])]
    else:
        content = [s.prompts[i]]
    return hashlib.sha256(json.dumps(content, ensure_ascii=True).encode()).hexdigest()[:12]


def _item_text(s: EvalSet, i: int) -> str:
    return s.items[i].question if isinstance(s, MCSet) else s.prompts[i]


def _labels(s: EvalSet, i: int) -> dict:
    """The item's labels as the data set has them now (a fixed category must not keep its old name)."""
    if isinstance(s, MCSet):
        return {"category": s.items[i].category}
    if isinstance(s, PromptSet):
        return {"category": s.categories[i], "macro": s.macro}
    return {}


def _reusable(store: ResultStore, key: str, s: EvalSet, i: int, batch: str, retry_failed: bool) -> bool:
    """A stored record answers item ``i`` of ``s`` as it is now, generated in the batch it would be in now.

    An edited data file is redone, not reused; so is an item whose batch changed (another ``batch_size``, items
    added or removed): its batch mates and sampling seed decide its reply, so only the same batch gives the
    reply an uninterrupted run would.
    """
    if not store.done(key, retry_failed):
        return False
    rec = store.records[key]
    return rec.get("item") == _item_digest(s, i) and rec.get("batch") == batch


def _batch_digest(s: EvalSet, idx: list[int], b: int) -> str:
    """Which items a batch holds, and its position (which sets its sampling seed)."""
    return hashlib.sha256(json.dumps([b, [s.ids[i] for i in idx]], ensure_ascii=True).encode()).hexdigest()[:12]


def evaluate(
    model_or_lens: TransformerBridge | SafetyLens | PreTrainedModel,
    datasets: Sequence[DataSpec],
    judge: str | Judge = "keyword",
    *,
    states: Mapping[str, Intervention] | None = None,
    settings: GenerationSettings | str = "greedy",
    max_new_tokens: Mapping[str, int] | None = None,
    out_dir: str | Path | None = None,
    data_paths: Mapping[str, str] | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    tokenizer: PreTrainedTokenizerBase | None = None,
    over_refusal_judge: OverRefusalJudge | None = None,
    mmlu_dev: MCSet | None = None,
    retry_failed: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
    progress: bool = True,
    backend: str | Backend = "hf",
) -> EvalReport:
    """Measure ASR, over-refusal and utility of one or more model states on public or own data sets.

    Args:
        model_or_lens: a ``TransformerBridge``, a :class:`SafetyLens`, or a plain HF model (with ``tokenizer``).
        datasets: names (``advbench``, ``harmbench``, ``jbb``, ``xstest``, ``mmlu``, ``truthfulqa``,
            ``bundled-qa`` …), ``name=PATH`` strings, or loaded :class:`PromptSet` / :class:`MCSet` /
            :class:`QASet` objects.
        judge: the harm judge: ``keyword``, ``llm``, ``llama-guard``, ``harmbench-classifier`` or an object
            with ``name`` and ``judge_batch(prompts, responses)``.
        states: state name → intervention (:mod:`sa_lens.interventions`), e.g. ``{"Original": Compose(),
            "HDR": HarmRemoval(hv, 3.0)}``; each is applied around its part of the run and undone after.
            Default ``{"Original": Compose()}``; when calling inside your own HDR or hook block, name the state
            (``{"HDR": Compose()}``) so the report does not call it Original.
        settings: a :class:`GenerationSettings` or a preset name (``greedy``, ``paper``).
        max_new_tokens: data set name → generation budget in tokens, overriding ``settings`` for that set
            (e.g. short QA answers beside longer replies to harmful requests).
        out_dir: report folder: ``results.jsonl`` (appended per batch, resumed on rerun), ``results.json``,
            ``summary.md``, ``comparison.md``. None keeps everything in memory.
        data_paths: name → local copy for names given without ``=PATH``.
        data_dir: a folder laid out like ``../shared/data`` for the other names (see :func:`load_sets`).
        limit: a fixed random subset of this many items per data set (seeded by ``seed``).
        batch_size: prompts (or questions) per batch; also the unit of loss on a crash.
        tokenizer: only for a plain HF model.
        over_refusal_judge: the judge for safe sets (default: XSTest classes by keyword rules).
        mmlu_dev: MMLU's dev split (``load_public("mmlu", path, split="dev")``) for 5-shot letter-scored sets, as
            the paper reports MMLU (lm-eval's first five dev questions of each subject); None scores zero-shot.
            Both use lm-eval's prompt (subject header, joint tokenisation); :func:`sa_lens.evaluation.utility`
            runs lm-eval itself.
        retry_failed: on resume, redo items whose judgement FAILED.
        n_boot: bootstrap resamples for the 95 % intervals.
        seed: subset and bootstrap seed (sampling seeds come from ``settings.seed``).
        progress: show a progress bar with ETA.
        backend: what generates the replies: ``"hf"`` (sa_lens's own loop on the bridge, default), ``"vllm"``, or
            a built backend such as ``sa_lens.vllm_backend.VLLMBackend(tensor_parallel_size=2)`` (engines are then
            the caller's to close). Multiple-choice sets are scored on the bridge in every case. Records of one
            backend are never reused by another (the key names vLLM's version, dtype and parallel sizes), and
            ``results.json`` says which backend served each state.

    Data parallel: run the same call under ``torchrun --nproc_per_node N`` (or ``accelerate launch``); each
    process does every N-th batch, rank 0 merges the records into ``out_dir`` (required) and writes the report,
    and every rank returns it (:mod:`sa_lens.evaluation.distributed`). The records equal one process's.

    Returns:
        An :class:`EvalReport`.

    Raises:
        DataError: a data set cannot be loaded (unknown name, unreachable hub, malformed file …).
        ValueError: an unknown judge, preset or backend, a state the backend cannot serve, a data-parallel run
            without ``out_dir``, batch_size < 1, no data sets, a state that is not an intervention, an ``out_dir``
            that is a file, or a ``results.jsonl`` there that holds a line that is not an evaluation record.
    """
    t0 = time.perf_counter()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer ≥ 1, got {batch_size!r}.")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 100:
        raise InputError(f"n_boot must be an integer ≥ 100 for a 95 % percentile interval, got {n_boot!r}.")
    if not datasets:
        raise InputError("no data sets given; name at least one (e.g. ['advbench', 'xstest']).")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise InputError(f"out_dir {out_dir} is a file, not a folder; the report needs a folder of its own.")
    model = model_or_lens.model if isinstance(model_or_lens, SafetyLens) else model_or_lens
    settings = preset(settings) if isinstance(settings, str) else settings
    harm_judge = get_judge(judge)
    refusal_judge = over_refusal_judge or OverRefusalJudge()
    sets = load_sets(datasets, data_paths, limit, seed, data_dir)
    if states is not None and not states:
        raise InputError("states is empty; pass at least one, e.g. {'Original': sa_lens.Compose()}, or leave it out.")
    states = dict(states or {"Original": Compose()})
    bad = [name for name, iv in states.items() if not isinstance(iv, Intervention)]
    if bad:
        raise InputError(
            f"states {bad} are not interventions; build each with sa_lens.interventions (Compose(), HarmRemoval, "
            "SafeAlign, …) so the resume key can tell configurations apart."
        )
    budgets = dict(max_new_tokens or {})
    odd = {k: v for k, v in budgets.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if odd:
        raise InputError(f"max_new_tokens values must be integers ≥ 1 (tokens); got {odd}.")
    unknown = sorted(set(budgets) - {s.name for s in sets})
    if unknown:
        raise InputError(f"max_new_tokens names {unknown}, which are not among the data sets {[s.name for s in sets]}.")
    settings_of = {s.name: dataclasses.replace(settings, max_new_tokens=budgets[s.name]) if s.name in budgets
                   else settings for s in sets}
    for iv in states.values():  # every state must fit the model before minutes of generation for the others
        iv.check(model)
    out = Path(out_dir) if out_dir is not None else None
    shard = Shard.from_env()
    store = open_store(out, shard)
    if all(s.kind == "mc" for s in sets):
        backend = "hf"  # nothing to generate: multiple choice is scored on the model, so no engine is started
    backend_owned = isinstance(backend, str)  # a backend object stays the caller's, engine and all
    gen_backend = get_backend(backend)
    gen_backend.check(states)
    model_id = model_name(model)

    shots = mmlu_shots(mmlu_dev) if mmlu_dev is not None else None
    # lm-eval's prompt and tokenisation (since issue 13): records scored the older way are not reused.
    mc_config = f"lmeval-{MMLU_SHOTS}shot" if shots is not None else "lmeval-0shot"

    def config_of(s: EvalSet, fingerprint: str, backend_key: str) -> str:
        if s.kind == "mc":  # scored on the model itself, whatever generates
            return f"{model_id}|{fingerprint}|mc-{s.scoring}|{mc_config if s.scoring == 'letter' else 'lmeval'}"
        # The HF path adds nothing: its keys keep the form they had before there were backends.
        digest = settings_of[s.name].digest() + (f"|{backend_key}" if backend_key else "")
        if s.kind == "qa":
            return f"{model_id}|{fingerprint}|{digest}|{BATCHING}|exact-match"
        judge_name = harm_judge.name if s.kind == "harmful" else refusal_judge.name
        return f"{model_id}|{fingerprint}|{digest}|{BATCHING}|{judge_name}"

    bar = tqdm(total=len(states) * sum(len(s) for s in sets), desc="evaluate", unit="item",
               disable=not progress or shard.rank != 0)
    items_run, fingerprints, served_by, configs, n_batch = 0, {}, {}, {}, 0
    try:
        for state in gen_backend.order(states):
            intervention = states[state]
            with gen_backend.serve(model, intervention, tokenizer) as served:
                # Keys carry every parameter of the intervention and a hash of the weights in this state, so records
                # of another configuration — also under the same state name — are never reused.
                fingerprints[state] = fp = f"{intervention.fingerprint()}:{state_fingerprint(model)}"
                served_by[state] = served.backend
                for s in sets:
                    configs[state, s.name] = cfg = config_of(s, fp, served.key)
                    bar.set_postfix_str(f"{state} · {s.name}")
                    for b, idx in enumerate(_batches(s, batch_size)):
                        n_batch += 1
                        if not shard.mine(n_batch - 1):
                            bar.update(len(idx))  # another rank's batch: the bar counts the whole job's items
                            continue
                        keys = [record_key(state, s.name, s.ids[i], cfg) for i in idx]
                        batch = _batch_digest(s, idx, b)
                        todo = [not _reusable(store, k, s, i, batch, retry_failed) for k, i in zip(keys, idx)]
                        if any(todo):
                            recs = _run_batch(model, tokenizer, s, idx, b, settings_of[s.name], harm_judge,
                                              refusal_judge, shots, served.generate)
                            for rec, k, i in zip(recs, keys, idx):
                                rec |= {"key": k, "state": state, "config": cfg, "item": _item_digest(s, i),
                                        "batch": batch}
                            store.append(r for r, redo in zip(recs, todo) if redo)
                            items_run += len(idx)
                        bar.update(len(idx))
    finally:
        if backend_owned:
            gen_backend.close()
    bar.close()
    if shard.parallel:
        items_run = shard.total(items_run)
        store = merge(out, shard)
    # In the caller's state order, whatever order the backend served them in.
    wanted = [store.records[record_key(state, s.name, s.ids[i], configs[state, s.name])] | _labels(s, i)
              for state in states for s in sets for i in range(len(s))]

    rows = summarize(wanted, n_boot, seed)
    config = {
        "model": model_id,
        "judge": harm_judge.name,
        "over_refusal_judge": refusal_judge.name,
        "settings": settings.__dict__,
        "max_new_tokens": budgets,
        "states": {name: {"name": iv.name, "fingerprint": iv.fingerprint(), "config": iv.to_dict(),
                          "backend": served_by[name]} for name, iv in states.items()},
        "datasets": {s.name: {"kind": s.kind, "n": len(s), "source": portable_name(s.source)} for s in sets},
        "limit": limit,
        "seed": seed,
        "n_boot": n_boot,
        "items_run": items_run,
        "processes": shard.world,
        "state_fingerprints": fingerprints,
    }
    report = EvalReport(rows, wanted, summary_table(rows), comparison_table(rows), out, 0.0, config)
    report.seconds = round(time.perf_counter() - t0, 1)
    if out is not None and shard.rank == 0:
        _write(report)
    return report


BATCHING = "by-length"
"""How items are grouped into batches; part of the resume key, since batches fix the sampling seeds."""


def _batches(s: EvalSet, batch_size: int) -> list[list[int]]:
    """Item indices in batches of similar text length (stable), fixed by the set's content.

    Similar lengths waste less compute on padding, and a batch depends only on the set and ``batch_size``,
    so a resumed run regenerates exactly the batches (and sampling seeds) of the first run.
    """
    order = sorted(range(len(s)), key=lambda i: len(_item_text(s, i)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _run_batch(
    model: Any,
    tokenizer: PreTrainedTokenizerBase | None,
    s: EvalSet,
    idx: list[int],
    batch_index: int,
    settings: GenerationSettings,
    harm_judge: Judge,
    refusal_judge: OverRefusalJudge,
    shots: Mapping[str, Sequence[MCItem]] | None,
    generate_fn: Callable[[list[str], GenerationSettings, int], list[str]],
) -> list[dict]:
    if isinstance(s, MCSet):
        items = [s.items[i] for i in idx]
        scores = score_items(model, s, items, tokenizer, batch_size=len(items),
                             shots=shots if s.scoring == "letter" else None)
        return [
            {"dataset": s.name, "kind": "mc", "scoring": s.scoring, "id": it.id, "category": it.category,
             "prompt": it.question, "score": sc}
            for it, sc in zip(items, scores)
        ]
    prompts = [s.prompts[i] for i in idx]
    # One seed per batch position: a resumed run samples each batch exactly as the first run did.
    replies = generate_fn(prompts, settings, settings.seed + batch_index)
    if isinstance(s, QASet):
        return [
            {"dataset": s.name, "kind": "qa", "id": s.ids[i], "category": "", "prompt": p, "response": r,
             "score": float(exact_match(r, s.answers[i]))}
            for i, p, r in zip(idx, prompts, replies)
        ]
    judge = harm_judge if s.kind == "harmful" else refusal_judge
    # Blank replies (empty, whitespace, end-of-turn markers) never reach a judge, a user's own judge included.
    verdicts = _checked(judge, s.kind, judge_nonblank(judge.judge_batch, prompts, replies))
    return [
        {"dataset": s.name, "kind": s.kind, "macro": s.macro, "id": s.ids[i], "category": s.categories[i],
         "prompt": p, "response": r, "verdict": v, "judge": judge.name}
        for i, p, r, v in zip(idx, prompts, replies, verdicts)
    ]


def _checked(judge: Any, kind: str, verdicts: list) -> list[str]:
    """The verdicts as stored values, refused before anything is written when a judge returns something else: a
    stored unknown value would fail every later summary, and a rerun would reuse it."""
    allowed = [v.value for v in (Verdict if kind == "harmful" else RefusalClass)]
    values = [getattr(v, "value", v) for v in verdicts]
    bad = [v for v in values if v not in allowed]
    if bad:
        what = "sa_lens.evaluation.Verdict" if kind == "harmful" else "sa_lens.evaluation.over_refusal.RefusalClass"
        raise InputError(f"judge {getattr(judge, 'name', judge)!r} returned {bad[0]!r} on a {kind} set; it must return "
                         f"{what} values ({', '.join(allowed)}) — return FAILED where it cannot decide.")
    return values



def _write(report: EvalReport) -> None:
    out = report.out_dir
    assert out is not None
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"config": report.config, "rows": report.rows, "seconds": report.seconds}, indent=2, default=str)
    )
    (out / "summary.md").write_text(report.summary + "\n")
    (out / "comparison.md").write_text(report.comparison + "\n")
