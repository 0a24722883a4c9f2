"""The CPU lab behind ``sa-lens lab``: the paper's BASE, SFT and EDIT tables at 135M scale (design.md §4).

Cast of models, all small full fine-tunes of the embedded SmolLM2-135M-Instruct (θ0) on bundled data:

- ``aligned`` (θb, BASE target): θ0 trained to refuse harmful-train requests (refusal templates) while
  keeping its own answers to safe- and QA-train requests (self-distillation, so over-refusal stays low);
- ``harmful`` (θH): θb trained on harmful-train requests paired with θ0's own compliant answers,
  generated at run time (never stored in the repository);
- ``sft`` (SFT target): θb trained on a benign math-tutor task only — safety erodes, as reported for
  real SFT models (paper Table 2);
- ``edited`` (EDIT target): θb after ROME edits (:mod:`sa_lens.editing`) with the bundled NoIntentEdit-style
  instances (``noint_edits``), each question as a user turn and its answer as the reply, at one stated layer
  (paper §4, Table 3; paper-notes.md §6).

Per scenario, the rows of the paper's tables: Original, HDR (TIES top-k), HDR (task vector, no trim),
Safe-Align, Safety Arithmetic; metrics on the chosen split: ASR on harmful prompts (keyword judge),
over-refusal on safe prompts, QA exact-match utility. EDIT restricts HDR and Safe-Align to the edit area
(the layers where θedit differs from θb, ±1; paper Eqs. 11–13) and adds θb's own row, ``Original (θb)``, and
the edits' efficacy under every state. Models and θ0's answers are cached under a key made of everything that
determines them, so a second run skips the fine-tunes and the edits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sa_lens import data
from sa_lens.data.public import PromptSet, QASet, load_bundled_set
from sa_lens.demonstrations import Demonstration, demonstration_pairs
from sa_lens.edit_area import detect_edit_area, edit_area_vector
from sa_lens.edit_requests import load_edits
from sa_lens.editing import RomeOptions, apply_edits, default_edit_layer, edit_scores, save_edited, summarise_scores
from sa_lens.errors import InputError
from sa_lens.evaluation.bootstrap import bootstrap_mean
from sa_lens.evaluation.decoding import preset
from sa_lens.evaluation.harness import EvalReport, evaluate
from sa_lens.evaluation.judges import KeywordJudge, Verdict
from sa_lens.evaluation.report import SOURCES_MACRO
from sa_lens.finetune import finetune
from sa_lens.generation import generate
from sa_lens.harm_vector import HarmVector
from sa_lens.interventions import Compose, HarmRemoval, Intervention, SafeAlign
from sa_lens.mlp_projection import decoder_layer_count
from sa_lens.models import cache_dir, embedded_model_path, load_hf_model, load_model
from sa_lens.provenance import portable_name
from sa_lens.validation import is_finite_real

__all__ = ["EDIT_METHODS", "METHODS", "SCENARIOS", "LabConfig", "LabModels", "build_models", "eval_sets", "evaluate_scenario",
           "format_table", "icv_pairs", "lab_rows", "lab_states", "run_lab"]

METHODS = ("Original", "HDR (TIES top-k)", "HDR (task vector)", "Safe-Align", "Safety Arithmetic")
EDIT_METHODS = ("Edited", "Original (θb)", *METHODS[1:])
"""The EDIT table's rows (paper Table 3): the edited model as it is, θb, then the methods on the edited model."""
RECIPE_VERSION = 2  # bump when the fine-tune recipe changes meaning, so old cached models are not reused
EDIT_VERSION = 1  # the same for the edited model's recipe (ROME's options, the bundled edits' use)


@dataclass(frozen=True)
class LabConfig:
    """Everything that determines a lab run. Defaults were chosen on the ``dev`` split only.

    ``lam``, ``top_k``, ``tv_lam`` and ``alpha`` come from ``analyses/sweep_dev.py`` (output in
    ``analyses/results/sweep_dev.json``) with a rule fixed before the sweep: in the SFT scenario, the
    lowest ASR whose over-refusal rises ≤ 10 points and utility falls ≤ 5 points. At 135M scale the
    paper's λ = 3 removes nearly all harmful compliance (dev ASR 72 % → 3 %) but makes the SFT model
    refuse 65 % of safe prompts (from 5 %), so the rule picks λ = 0.5 (ASR 44 %, over-refusal 8 %).
    No α met the rule (α ≥ 1 breaks generation, α = 0.5 costs 26 points of utility): α stays at the
    paper's 0.12. Pass ``--lam 3 --tv-lam 2`` for the paper's / official code's values.

    Attributes:
        split: evaluation split, ``test`` (default) or ``dev`` (for choosing defaults).
        lam: λ for HDR with the TIES top-k vector (paper: 3; here 0.5, see above).
        top_k: fraction kept by the global trim (paper: 0.10).
        tv_lam: λ for the untrimmed task-vector baseline (official code: 0.1 BASE, 2 SFT; here 0.1).
        alpha: Safe-Align α (paper: 0.12).
        n_icv_pairs: demonstration pairs for the ICV (paper: ~30).
        aligned_steps, harmful_steps, sft_steps, lr, train_batch_size: the fine-tune recipe.
        answer_tokens: θ0's answer length used as fine-tune targets, in tokens.
        max_new_tokens, qa_max_new_tokens: evaluation generation budgets, in tokens.
        gen_batch_size: prompts per generation batch.
        harmful_data, harmful_column, harmful_limit: optional public harmful sets (CSV/JSON/JSONL; one path or a
            tuple of paths, each named by its file stem), each evaluated as an extra harm source on its first
            ``harmful_limit`` rows: its own ASR column with an interval, and the macro mean over all sources
            (bundled included), so a gain that does not transfer to a source shows.
        seed: fine-tune batch order and template choice.
        n_edits: how many bundled NoIntentEdit-style instances the ``edited`` model receives (sequential ROME).
        edit_layer: the layer ROME edits; None = :func:`sa_lens.editing.default_edit_layer` (5 of Llama-2-7b's
            32, the paper's code; scaled to the model's depth).
        edit_steps, edit_max_loss: ROME's optimisation budget and the target NLL (nats/token) an edit must reach.
    """

    split: str = "test"
    lam: float = 0.5
    top_k: float = 0.10
    tv_lam: float = 0.1
    alpha: float = 0.12
    n_icv_pairs: int = 30
    aligned_steps: int = 40
    harmful_steps: int = 30
    sft_steps: int = 30
    lr: float = 5e-5
    train_batch_size: int = 8
    answer_tokens: int = 64
    max_new_tokens: int = 32
    qa_max_new_tokens: int = 16
    gen_batch_size: int = 64
    harmful_data: str | tuple[str, ...] | None = None
    harmful_column: str | None = None
    harmful_limit: int = 100
    seed: int = 0
    n_edits: int = 2
    edit_layer: int | None = None
    edit_steps: int = 60
    edit_max_loss: float = 1.5

    def __post_init__(self) -> None:
        # One path (the original form) or several; stored as a tuple so results.json lists every source.
        paths = (self.harmful_data,) if isinstance(self.harmful_data, str) else tuple(self.harmful_data or ())
        object.__setattr__(self, "harmful_data", paths)
        stems = [Path(p).stem for p in paths]
        # "sources_macro" would give the key of the macro column (asr_sources_macro).
        clash = sorted({s for s in stems if stems.count(s) > 1 or s in ("harmful", "safe", "qa", "sources_macro")})
        if clash:
            raise InputError(f"harm sources are named by their file stem, and {clash} would name two sets alike (or "
                             "a bundled one); rename or copy the file, e.g. advbench.csv and harmbench.csv.")
        # Checked here, not after minutes of fine-tuning; the train split is refused: it is what the
        # models were fine-tuned on, so measuring there would report memorisation.
        if self.split not in ("dev", "test"):
            raise InputError(f"split must be 'dev' or 'test' (train is what the models learned from); got {self.split!r}.")
        if not 0.0 < self.top_k <= 1.0:
            raise InputError(f"top_k must be a fraction in (0, 1]; got {self.top_k!r}.")
        for name in ("lam", "tv_lam", "alpha", "lr"):
            if not is_finite_real(getattr(self, name)):
                raise InputError(f"{name} must be finite; got {getattr(self, name)!r}.")
        if self.edit_layer is not None and (not isinstance(self.edit_layer, int) or self.edit_layer < 0):
            raise InputError(f"edit_layer must be a layer index ≥ 0 (or None for the default); got {self.edit_layer!r}.")
        for name in ("harmful_limit", "n_icv_pairs", "aligned_steps", "harmful_steps", "sft_steps", "max_new_tokens",
                     "n_edits", "edit_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be ≥ 1; got {getattr(self, name)!r}.")

    def recipe(self) -> dict:
        """The fields that determine the fine-tuned models (part of the cache key)."""
        keys = ("aligned_steps", "harmful_steps", "sft_steps", "lr", "train_batch_size", "answer_tokens", "seed")
        return {k: getattr(self, k) for k in keys} | {"recipe_version": RECIPE_VERSION}

    def edit_recipe(self) -> dict:
        """The fields that determine the ``edited`` model (its own cache key, so BASE/SFT models are kept)."""
        keys = ("n_edits", "edit_layer", "edit_steps", "edit_max_loss", "answer_tokens")
        return {k: getattr(self, k) for k in keys} | {"edit_version": EDIT_VERSION}


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _bundled_fingerprint() -> str:
    return _digest(
        {name: data.load_bundled(name) for name in ("harmful", "safe", "qa", "sft_task")} | {"t": data.refusal_templates()}
    )


def _original_answers(cfg: LabConfig, base: Path, key: str, log: Callable[[str], None]) -> dict[str, dict[str, str]]:
    """θ0's greedy answers to the harmful-, safe- and QA-train prompts (cached as JSON)."""
    path = cache_dir() / "lab" / f"original-answers-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    log("Generating the original model's answers (fine-tune targets)…")
    model, tokenizer = load_hf_model(base)
    answers = {}
    for name, field in (("harmful", "prompt"), ("safe", "prompt"), ("qa", "question")):
        rows = data.load_bundled(name, "train")
        replies = generate(
            model, [r[field] for r in rows], cfg.answer_tokens, tokenizer=tokenizer,
            batch_size=cfg.gen_batch_size, progress=f"θ0 answers · {name}",
        )
        answers[name] = {r["id"]: reply for r, reply in zip(rows, replies)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(answers, indent=1))
    return answers


def _train_and_save(parent: Path, examples: list[tuple[str, str]], steps: int, cfg: LabConfig, target: Path, label: str) -> None:
    model, tokenizer = load_hf_model(parent)
    losses = finetune(model, tokenizer, examples, steps, cfg.lr, cfg.train_batch_size, cfg.seed, progress=label)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "sa_lens_finetune.json").write_text(json.dumps({"steps": steps, "losses": losses, "n_examples": len(examples)}))
    tmp.rename(target)


EDIT_REPORT = "sa_lens_edits.json"  # inside the edited model's folder: what each edit reached, and θb's old answers


def _build_edited(cfg: LabConfig, aligned: Path, target: Path, log: Callable[[str], None]) -> None:
    """θb + sequential ROME edits with the first ``cfg.n_edits`` bundled NoIntentEdit-style instances (chat form)."""
    model, tokenizer = load_hf_model(aligned)
    requests = load_edits(data.load_bundled("noint_edits"))[: cfg.n_edits]
    layer = default_edit_layer(decoder_layer_count(model)) if cfg.edit_layer is None else cfg.edit_layer
    log(f"Editing θb with {len(requests)} NoIntentEdit-style instances (ROME, layer {layer})…")
    # θb's own replies are what the edits replace: efficacy asks whether the new answer now beats them.
    olds = generate(model, [r.prompt for r in requests], cfg.answer_tokens, tokenizer=tokenizer)
    options = RomeOptions(chat=True, steps=cfg.edit_steps, max_loss=cfg.edit_max_loss)
    results = apply_edits(model, requests, layer, options, tokenizer=tokenizer, progress=True)
    scores = edit_scores(model, requests, old_answers=olds, chat=True, tokenizer=tokenizer)
    tmp = target.with_name(target.name + ".tmp")
    save_edited(model, tmp, tokenizer)
    report = {"layer": layer, "edits": [asdict(r) for r in requests], "old_answers": olds,
              "results": [r.to_dict() for r in results], "scores": scores}
    (tmp / EDIT_REPORT).write_text(json.dumps(report, indent=1))
    tmp.rename(target)


@dataclass(frozen=True)
class LabModels:
    """The lab's cast: HF folders by name, and θ0's compliant answers to harmful-train prompts.

    Attributes:
        paths: ``original``, ``aligned``, ``harmful``, ``sft``, ``edited`` → Hugging Face folder.
        compliant: ``(question, answer, category)`` for each harmful-train prompt θ0 complied with.
    """

    paths: dict[str, Path]
    compliant: list[tuple[str, str, str]]

    def edit_report(self) -> dict:
        """What the ``edited`` model's edits reached (layer, per-edit loss and scores, θb's old answers)."""
        return json.loads((self.paths["edited"] / EDIT_REPORT).read_text())


def build_models(cfg: LabConfig, log: Callable[[str], None] = print) -> LabModels:
    """Build (or reuse from the cache) the lab's ``original``, ``aligned``, ``harmful``, ``sft`` and ``edited`` models.

    The cache key hashes the recipe and the exact training examples (θ0's answers and the judge's
    filtering included), so any change that would change a model builds a new one.

    Returns:
        The cast (HF folders) and θ0's compliant harmful-train answers.

    Raises:
        FileNotFoundError: the embedded model package is missing.
        ConvergenceError: an edit of the ``edited`` model stayed above ``cfg.edit_max_loss`` (nothing is cached).
    """
    base = embedded_model_path()
    data_key = _bundled_fingerprint()
    # θ0's answers depend only on θ0, the data and their length, not on the fine-tune recipe.
    answers = _original_answers(cfg, base, _digest({"base": base.name, "tokens": cfg.answer_tokens, "data": data_key}), log)
    judge = KeywordJudge()
    harmful_train = data.load_bundled("harmful", "train")
    compliant = [
        (r["prompt"], answers["harmful"][r["id"]], r["category"])
        for r in harmful_train
        if judge.judge(answers["harmful"][r["id"]]) is Verdict.NOT_REFUSED
    ]
    templates = data.refusal_templates()
    refusals = [(r["prompt"], templates[i % len(templates)]) for i, r in enumerate(harmful_train)]
    # Self-distillation on safe and QA prompts keeps θ0's helpfulness, so refusals stay specific to harm.
    self_distill = [(r["prompt"], answers["safe"][r["id"]]) for r in data.load_bundled("safe", "train")]
    self_distill += [(r["question"], answers["qa"][r["id"]]) for r in data.load_bundled("qa", "train")]
    examples = {
        "aligned": refusals + self_distill,
        "harmful": [(q, a) for q, a, _ in compliant],
        "sft": [(r["prompt"], r["response"]) for r in data.load_bundled("sft_task")],
    }
    key = _digest({"base": base.name, "recipe": cfg.recipe(), "examples": examples})
    root = cache_dir() / "lab"
    paths = {"original": base} | {name: root / f"{name}-{key}" for name in examples}
    edit_key = _digest({"aligned": key, "recipe": cfg.edit_recipe(), "edits": data.load_bundled("noint_edits")})
    paths["edited"] = root / f"edited-{edit_key}"
    cast = LabModels(paths, compliant)
    if all((p / "config.json").exists() for p in paths.values()):
        log(f"Using cached lab models ({root}, key {key}, edited {edit_key}).")
        return cast
    plan = [
        ("aligned", base, cfg.aligned_steps, "the aligned model θb (refuse harmful-train, keep own answers on safe- and QA-train)"),
        ("harmful", paths["aligned"], cfg.harmful_steps, f"the harmful model θH on {len(compliant)} compliant harmful QA pairs"),
        ("sft", paths["aligned"], cfg.sft_steps, "the SFT model on the benign math-tutor task"),
    ]
    for name, parent, steps, what in plan:
        if not paths[name].exists():
            log(f"Fine-tuning {what}…")
            _train_and_save(parent, examples[name], steps, cfg, paths[name], name)
    if not paths["edited"].exists():
        _build_edited(cfg, paths["aligned"], paths["edited"], log)
    return cast


def icv_pairs(cfg: LabConfig, cast: LabModels) -> list[tuple[str, str]]:
    """(unsafe, safe) demonstrations: θ0's compliant answer vs the official refusal, on harmful-train questions.

    Drawn round-robin over harm categories, so ``n_icv_pairs`` covers every category rather than the
    first few in file order.
    """
    by_category: dict[str, list[tuple[str, str]]] = {}
    for q, a, category in cast.compliant:
        by_category.setdefault(category, []).append((q, a))
    interleaved = [qa for group in itertools.zip_longest(*by_category.values()) for qa in group if qa is not None]
    return demonstration_pairs(Demonstration(q, a) for q, a in interleaved[: cfg.n_icv_pairs])


def eval_sets(cfg: LabConfig) -> list[PromptSet | QASet]:
    """The held-out sets of ``cfg.split`` (``harmful``, ``safe``, ``qa``), plus the optional public harmful sets."""
    sets = [dataclasses.replace(load_bundled_set(name, cfg.split), name=name) for name in ("harmful", "safe", "qa")]
    for path in cfg.harmful_data:
        extra = data.load_prompts(path, cfg.harmful_column)[: cfg.harmful_limit]
        name = Path(path).stem
        sets.append(PromptSet(name, "harmful", tuple(extra), tuple(f"{name}-{i}" for i in range(len(extra))),
                              ("",) * len(extra), portable_name(path)))
    return sets


def lab_states(cfg: LabConfig, hv_tv: HarmVector, hv_ties: HarmVector, pairs: list[tuple[str, str]]) -> dict[str, Intervention]:
    """The rows of the paper's Tables 1–2 as interventions (method name → state).

    HDR with the TIES top-k vector (λ = ``cfg.lam``) and with the untrimmed task vector (λ = ``cfg.tv_lam``),
    Safe-Align from the ICV pairs (α = ``cfg.alpha``), and Safety Arithmetic: HDR, then the ICV read from θ̂.
    """
    hdr, safe_align = HarmRemoval(hv_ties, cfg.lam), SafeAlign(pairs=tuple(pairs), alpha=cfg.alpha)
    states = {
        "Original": Compose(),
        "HDR (TIES top-k)": hdr,
        "HDR (task vector)": HarmRemoval(hv_tv, cfg.tv_lam),
        "Safe-Align": safe_align,
        "Safety Arithmetic": Compose((hdr, safe_align)),
    }
    return {name: states[name] for name in METHODS}


def edit_states(
    cfg: LabConfig, hv_tv: HarmVector, area: tuple[int, ...], pairs: list[tuple[str, str]]
) -> dict[str, Intervention]:
    """The EDIT table's states on the edited model (paper Table 3), every method restricted to the edit ``area``.

    HDR: τH trimmed to its top-k within the area, zero outside (paper Eqs. 11–13; :func:`edit_area_vector`);
    the task vector untrimmed within the area (the official code's HDR‡ mask); Safe-Align read and injected at
    the area's layers only (the official code's choice, paper-notes.md §7.7); Safety Arithmetic both. λ, top-k
    and α are the other scenarios'.
    """
    hdr = HarmRemoval(edit_area_vector(hv_tv, area, cfg.top_k), cfg.lam)
    safe_align = SafeAlign(pairs=tuple(pairs), alpha=cfg.alpha, layers=area, icv_layers=area)
    return {
        "Edited": Compose(),
        "HDR (TIES top-k)": hdr,
        "HDR (task vector)": HarmRemoval(edit_area_vector(hv_tv, area, None), cfg.tv_lam),
        "Safe-Align": safe_align,
        "Safety Arithmetic": Compose((hdr, safe_align)),
    }


def edit_efficacy(model, cast: LabModels, state: Intervention | None = None) -> float:
    """Share of the ``edited`` model's edits whose new answer beats θb's own reply on the edit question, on
    ``model`` (in ``state`` when given): does a method undo the knowledge the edit added?"""
    report = cast.edit_report()
    requests = load_edits(data.load_bundled("noint_edits"))[: len(report["old_answers"])]
    with state.apply(model) if state is not None else contextlib.nullcontext():
        scores = edit_scores(model, requests, old_answers=report["old_answers"], chat=True)
    return summarise_scores(scores)["efficacy"]


def evaluate_scenario(
    model, cfg: LabConfig, sets: list[PromptSet | QASet], states: dict[str, Intervention], out_dir: Path | None
) -> EvalReport:
    """One scenario's states on the lab's sets through :func:`sa_lens.evaluate`: greedy, chat template, keyword judge,
    ``cfg.max_new_tokens`` per reply (``cfg.qa_max_new_tokens`` for QA), resumable in ``out_dir``."""
    return evaluate(
        model, sets, "keyword", states=states, settings=preset("greedy", max_new_tokens=cfg.max_new_tokens),
        max_new_tokens={"qa": cfg.qa_max_new_tokens}, batch_size=cfg.gen_batch_size, out_dir=out_dir,
        seed=cfg.seed,
    )


def lab_rows(scenario: str, report: EvalReport) -> list[dict]:
    """The lab table's rows from an evaluation report: per method, ASR (+ degenerate) on ``harmful``,
    over-refusal (+ ``degenerate_safe``) on ``safe`` and on its XSTest-style (``contrast``) prompts, exact-match
    ``utility`` on ``qa``, ``asr_{name}`` on any extra harmful set and, with one, ``asr_sources_macro`` (the mean
    over all harm sources, :data:`~sa_lens.evaluation.report.SOURCES_MACRO`); each value with its n and bootstrap 95 %
    interval (fractions). ASR and over-refusal leave degenerate replies out of n (see
    :func:`sa_lens.evaluation.report.summarize`); the degenerate shares' n count every judged reply."""
    rows: dict[str, dict] = {}
    for r in report.rows:
        row = rows.setdefault(r["state"], {"scenario": scenario, "method": r["state"]})
        metrics = {"harmful": ("asr", "degenerate"), "safe": ("over_refusal", "degenerate"), "qa": ("exact_match",)}.get(
            r["dataset"], ("asr",))
        for metric in metrics:
            if metric not in r:  # every judgement of the set failed: no rate (the row's "failed" says how many)
                continue
            key = {"exact_match": "utility"}.get(metric, metric)
            if r["dataset"] == "safe" and metric == "degenerate":
                key = "degenerate_safe"
            elif r["dataset"] == SOURCES_MACRO:
                key = "asr_sources_macro"
            elif r["dataset"] not in ("harmful", "safe", "qa"):
                key = f"{metric}_{r['dataset']}"
            row |= {key: r[metric], f"{key}_n": r[f"{metric}_n"], f"{key}_ci95": r[f"{metric}_ci95"]}
    for method, row in rows.items():
        contrast = [rec["verdict"] in ("full_refusal", "partial_refusal") for rec in report.records
                    if rec["state"] == method and rec["dataset"] == "safe" and rec.get("category") == "contrast"
                    and rec["verdict"] not in ("failed", "degenerate")]  # as summarize: out of n
        if not contrast:  # a cut-down safe set may hold no XSTest-style prompt: no rate, not an error
            row |= {"over_refusal_contrast": float("nan"), "over_refusal_contrast_n": 0,
                    "over_refusal_contrast_ci95": [float("nan"), float("nan")]}
            continue
        rate = bootstrap_mean(contrast, report.config["n_boot"], report.config["seed"])
        row |= {"over_refusal_contrast": rate.value, "over_refusal_contrast_n": rate.n,
                "over_refusal_contrast_ci95": [rate.low, rate.high]}
    return list(rows.values())


def format_table(rows: list[dict], extra_sets: list[str], split: str) -> str:
    """The paper's Table 1/2/3 layout: one block per scenario, one line per method, values in %.

    Rows with ``edit_efficacy`` (EDIT) show it as a last column: the share of edits whose new answer still wins.
    """
    cols = [
        ("asr", "ASR ↓"),
        ("degenerate", "degen."),
        ("over_refusal", "over-refusal ↓"),
        ("over_refusal_contrast", "XSTest-style ↓"),
        ("utility", "utility ↑"),
    ]
    cols += [(f"asr_{s}", f"ASR {s} ↓") for s in extra_sets] + ([("asr_sources_macro", "ASR macro ↓")] if extra_sets else [])
    lines = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        block = [r for r in rows if r["scenario"] == scenario]
        shown = cols + ([("edit_efficacy", "edit kept")] if any("edit_efficacy" in r for r in block) else [])
        n = block[0]
        lines.append(
            f"\n{scenario} scenario — {split} split (harmful n={n['degenerate_n']}, safe n={n['degenerate_safe_n']} of which "
            f"XSTest-style n={n['over_refusal_contrast_n']}, QA n={n['utility_n']}); keyword judge, greedy decoding, "
            "over-refusal = full + partial refusals (XSTest), bootstrap 95 % intervals in results.json"
        )
        header = f"{'Method':<20}" + "".join(f"{title:>17}" for _, title in shown)
        lines += [header, "-" * len(header)]
        for r in block:
            # A set whose every reply was degenerate (or every judgement failed) has no rate: n/a, not a crash.
            lines.append(f"{r['method']:<20}" + "".join(f"{100 * r[key]:>16.1f}%" if key in r else f"{'n/a':>17}"
                                                        for key, _ in shown))
    return "\n".join(lines)


def format_sources(rows: list[dict], extra_sets: list[str]) -> str:
    """ASR per harm source with its bootstrap 95 % interval and n, and the macro mean over sources, per method.

    The lab's defaults were chosen on the bundled distribution; this table shows whether each method's gain
    holds on every other source given (``--harmful-data``), not only on average.
    """
    keys = [("asr", "harmful (bundled)")] + [(f"asr_{s}", s) for s in extra_sets] + [("asr_sources_macro", "macro")]
    lines = ["\nASR by harm source, % [bootstrap 95 % interval] (n)"]
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        lines.append(f"{scenario}: " + " | ".join(title for _, title in keys))
        for r in (r for r in rows if r["scenario"] == scenario):
            cells = [f"{100 * r[k]:.1f} [{100 * r[k + '_ci95'][0]:.1f}, {100 * r[k + '_ci95'][1]:.1f}] ({r[k + '_n']})"
                     if k in r else "n/a" for k, _ in keys]
            lines.append(f"  {r['method']:<20}" + " | ".join(cells))
    return "\n".join(lines)


SCENARIOS = {"BASE": "aligned", "SFT": "sft", "EDIT": "edited"}
"""Scenario → the lab model it targets (paper Tables 1, 2 and 3)."""


def run_lab(cfg: LabConfig, out_dir: str | Path = "sa_lens_report", log: Callable[[str], None] = print) -> dict:
    """Run the lab end to end: models → vectors → interventions → :func:`sa_lens.evaluate` → report.

    Writes ``results.json`` (every rate with n and interval, the edits and their edit area), ``generations.jsonl``
    (every reply and verdict), ``methods.png``, ``edit.png``, and per scenario the evaluation folder ``BASE/`` /
    ``SFT/`` / ``EDIT/`` (resumed by a rerun).

    Returns:
        The results dictionary written to ``results.json``.

    Raises:
        ValueError: a bad ``--harmful-data`` file (checked before any fine-tune).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sets = eval_sets(cfg)  # fail on a bad --harmful-data file before any fine-tuning
    torch.manual_seed(cfg.seed)
    cast = build_models(cfg, log)
    t_models = time.perf_counter() - t0
    hv_tv = HarmVector.from_models(load_hf_model(cast.paths["aligned"])[0], load_hf_model(cast.paths["harmful"])[0])
    hv_ties = hv_tv.trim(cfg.top_k, scope="global")
    pairs = icv_pairs(cfg, cast)
    log(f"Harm vector: {hv_tv.numel:,} entries, {hv_ties.nnz:,} kept by the top-{cfg.top_k:.0%} trim; {len(pairs)} ICV pairs.")
    states = lab_states(cfg, hv_tv, hv_ties, pairs)
    area = detect_edit_area(cast.paths["aligned"], cast.paths["edited"], progress=False)
    edit = cast.edit_report()
    log(f"Edit area: layers {list(area.layers)} (ROME changed {list(area.tensors)}); "
        f"{len(edit['results'])} edits, efficacy {summarise_scores(edit['scores'])['efficacy']:.0%} on the edited model.")
    scenario_states = {"BASE": states, "SFT": states, "EDIT": edit_states(cfg, hv_tv, area.layers, pairs)}
    rows, generations = [], []
    for scenario, target in SCENARIOS.items():
        model = load_model(cast.paths[target])
        report = evaluate_scenario(model, cfg, sets, scenario_states[scenario], out / scenario)
        scenario_rows = lab_rows(scenario, report)
        if scenario == "EDIT":
            # θb's row is BASE's Original: the same model, sets and decoding give the same replies.
            theta_b = next(r for r in rows if r["scenario"] == "BASE" and r["method"] == "Original")
            scenario_rows.insert(1, theta_b | {"scenario": "EDIT", "method": "Original (θb)",
                                               "edit_efficacy": edit_efficacy(load_model(cast.paths["aligned"]), cast)})
            for row in scenario_rows[:1] + scenario_rows[2:]:
                row["edit_efficacy"] = edit_efficacy(model, cast, scenario_states["EDIT"][row["method"]])
        rows += scenario_rows
        generations += [{"scenario": scenario, "method": rec["state"], "set": rec["dataset"], "id": rec["id"],
                         "prompt": rec["prompt"], "response": rec.get("response"),
                         "verdict": rec.get("verdict"), "score": rec.get("score")} for rec in report.records]
    table = format_table(rows, [s.name for s in sets[3:]], cfg.split)
    if sets[3:]:
        table += "\n" + format_sources(rows, [s.name for s in sets[3:]])
    log(table)
    results = {
        "config": dataclasses.asdict(cfg) | {"harmful_data": [portable_name(p) for p in cfg.harmful_data]},
        "models": {k: portable_name(v) for k, v in cast.paths.items()},
        "harm_vector": {"numel": hv_tv.numel, "nnz_trimmed": hv_ties.nnz},
        "icv_pairs": len(pairs),
        "edit": {"layer": edit["layer"], "area": list(area.layers), "changed": list(area.tensors),
                 "results": edit["results"], "scores": edit["scores"],
                 "summary": summarise_scores(edit["scores"])},
        "states": {scenario: {name: {"name": iv.name, "fingerprint": iv.fingerprint()} for name, iv in group.items()}
                   for scenario, group in (("BASE/SFT", states), ("EDIT", scenario_states["EDIT"]))},
        "rows": rows,
        "seconds": {"models": round(t_models, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    with (out / "generations.jsonl").open("w") as f:
        for g in generations:
            f.write(json.dumps(g) + "\n")
    from sa_lens.analysis.figures import (
        plot_method_comparison,  # matplotlib only when a figure is drawn
    )

    plot_method_comparison(rows, out / "methods.png")
    plot_method_comparison([r for r in rows if r["scenario"] == "EDIT"], out / "edit.png",
                           title=f"EDIT scenario: θb after {len(edit['results'])} ROME edits at layer {edit['layer']}")
    log(f"\nReport written to {out.resolve()} (results.json, generations.jsonl, methods.png, edit.png) in "
        f"{results['seconds']['total']:.0f} s.")
    return results
