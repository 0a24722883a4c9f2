"""The CPU lab behind ``sa-lens lab``: the paper's BASE and SFT tables at 135M scale (design.md §4).

Cast of models, all small full fine-tunes of the embedded SmolLM2-135M-Instruct (θ0) on bundled data:

- ``aligned`` (θb, BASE target): θ0 trained to refuse harmful-train requests (refusal templates) while
  keeping its own answers to safe- and QA-train requests (self-distillation, so over-refusal stays low);
- ``harmful`` (θH): θb trained on harmful-train requests paired with θ0's own compliant answers,
  generated at run time (never stored in the repository);
- ``sft`` (SFT target): θb trained on a benign math-tutor task only — safety erodes, as reported for
  real SFT models (paper Table 2).

Per scenario, the rows of the paper's tables: Original, HDR (TIES top-k), HDR (task vector, no trim),
Safe-Align, Safety Arithmetic; metrics on the chosen split: ASR on harmful prompts (keyword judge),
over-refusal on safe prompts, QA exact-match utility. Models and θ0's answers are cached under a key
made of everything that determines them, so a second run skips the fine-tunes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sa_lens import data
from sa_lens.analysis.figures import plot_method_comparison
from sa_lens.errors import InputError
from sa_lens.evaluation.judges import KeywordJudge, Verdict
from sa_lens.evaluation.runner import EvalSet, StateResult, evaluate_state
from sa_lens.finetune import finetune
from sa_lens.generation import generate
from sa_lens.harm_vector import HarmVector
from sa_lens.lens import SafetyLens
from sa_lens.models import cache_dir, embedded_model_path, load_hf_model, load_model
from sa_lens.safety_vector import SAFE_DEMO_ANSWER, SafetyVector, demonstration_text
from sa_lens.validation import is_finite_real

__all__ = ["LabConfig", "LabModels", "LabSession", "METHODS", "build_models", "format_table", "run_lab"]

METHODS = ("Original", "HDR (TIES top-k)", "HDR (task vector)", "Safe-Align", "Safety Arithmetic")
RECIPE_VERSION = 2  # bump when the fine-tune recipe changes meaning, so old cached models are not reused


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
        harmful_data, harmful_column, harmful_limit: an optional public harmful set (CSV/JSON/JSONL)
            evaluated as an extra ASR column on its first ``harmful_limit`` rows.
        seed: fine-tune batch order and template choice.
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
    harmful_data: str | None = None
    harmful_column: str | None = None
    harmful_limit: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        # Checked here, not after minutes of fine-tuning; the train split is refused: it is what the
        # models were fine-tuned on, so measuring there would report memorisation.
        if self.split not in ("dev", "test"):
            raise InputError(f"split must be 'dev' or 'test' (train is what the models learned from); got {self.split!r}.")
        if not 0.0 < self.top_k <= 1.0:
            raise InputError(f"top_k must be a fraction in (0, 1]; got {self.top_k!r}.")
        for name in ("lam", "tv_lam", "alpha", "lr"):
            if not is_finite_real(getattr(self, name)):
                raise InputError(f"{name} must be finite; got {getattr(self, name)!r}.")
        for name in ("harmful_limit", "n_icv_pairs", "aligned_steps", "harmful_steps", "sft_steps", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be ≥ 1; got {getattr(self, name)!r}.")

    def recipe(self) -> dict:
        """The fields that determine the fine-tuned models (part of the cache key)."""
        keys = ("aligned_steps", "harmful_steps", "sft_steps", "lr", "train_batch_size", "answer_tokens", "seed")
        return {k: getattr(self, k) for k in keys} | {"recipe_version": RECIPE_VERSION}


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


@dataclass(frozen=True)
class LabModels:
    """The lab's cast: HF folders by name, and θ0's compliant answers to harmful-train prompts.

    Attributes:
        paths: ``original``, ``aligned``, ``harmful``, ``sft`` → Hugging Face folder.
        compliant: ``(question, answer, category)`` for each harmful-train prompt θ0 complied with.
    """

    paths: dict[str, Path]
    compliant: list[tuple[str, str, str]]


def build_models(cfg: LabConfig, log: Callable[[str], None] = print) -> LabModels:
    """Build (or reuse from the cache) the lab's ``original``, ``aligned``, ``harmful`` and ``sft`` models.

    The cache key hashes the recipe and the exact training examples (θ0's answers and the judge's
    filtering included), so any change that would change a model builds a new one.

    Returns:
        The cast (HF folders) and θ0's compliant harmful-train answers.

    Raises:
        FileNotFoundError: the embedded model package is missing.
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
    cast = LabModels(paths, compliant)
    if all((p / "config.json").exists() for p in paths.values()):
        log(f"Using cached lab models ({root}, key {key}).")
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
    return [
        (demonstration_text(q, a), demonstration_text(q, SAFE_DEMO_ANSWER)) for q, a in interleaved[: cfg.n_icv_pairs]
    ]


def eval_sets(cfg: LabConfig) -> list[EvalSet]:
    """The held-out sets of ``cfg.split``, plus the optional public harmful set."""
    harmful = data.load_bundled("harmful", cfg.split)
    safe = data.load_bundled("safe", cfg.split)
    qa = data.load_bundled("qa", cfg.split)
    sets = [
        EvalSet("harmful", "harmful", [r["prompt"] for r in harmful], [r["id"] for r in harmful],
                max_new_tokens=cfg.max_new_tokens, groups=[r["category"] for r in harmful]),
        EvalSet("safe", "safe", [r["prompt"] for r in safe], [r["id"] for r in safe],
                max_new_tokens=cfg.max_new_tokens, groups=[r["type"] for r in safe]),
        EvalSet("qa", "qa", [r["question"] for r in qa], [r["id"] for r in qa], [r["answers"] for r in qa], cfg.qa_max_new_tokens),
    ]
    if cfg.harmful_data:
        extra = data.load_prompts(cfg.harmful_data, cfg.harmful_column)[: cfg.harmful_limit]
        name = Path(cfg.harmful_data).stem
        sets.append(EvalSet(name, "harmful", extra, [f"{name}-{i}" for i in range(len(extra))], max_new_tokens=cfg.max_new_tokens))
    return sets


class LabSession:
    """The built cast, harm vector, ICV pairs and held-out sets, ready to measure any (scenario, method).

    Sweeps reuse one session with configs that differ in ``lam``, ``top_k``, ``tv_lam`` or ``alpha``
    (see ``analyses/sweep_dev.py``); everything else comes from the config the session was opened with.
    """

    def __init__(self, cfg: LabConfig, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.sets = eval_sets(cfg)  # fail on a bad --harmful-data file before any fine-tuning
        torch.manual_seed(cfg.seed)
        self.cast = build_models(cfg, log)
        base_hf, _ = load_hf_model(self.cast.paths["aligned"])
        harmful_hf, _ = load_hf_model(self.cast.paths["harmful"])
        self.hv_tv = HarmVector.from_models(base_hf, harmful_hf)
        self.pairs = icv_pairs(cfg, self.cast)
        self._trimmed: dict[float, HarmVector] = {}
        self._model: tuple[str, object] | None = None

    def harm_vector(self, top_k: float) -> HarmVector:
        """The TIES top-k vector (global trim), cached per ``top_k``."""
        if top_k not in self._trimmed:
            self._trimmed[top_k] = self.hv_tv.trim(top_k, scope="global")
        return self._trimmed[top_k]

    def model(self, scenario: str):
        """The target bridge of a scenario (``BASE`` → aligned, ``SFT`` → sft); one held at a time."""
        if self._model is None or self._model[0] != scenario:
            self._model = (scenario, load_model(self.cast.paths["aligned" if scenario == "BASE" else "sft"]))
        return self._model[1]

    def _context(self, method: str, cfg: LabConfig) -> AbstractContextManager:
        lens, hv = SafetyLens(self._model[1]), self.harm_vector(cfg.top_k)
        contexts = {
            "Original": nullcontext,
            "HDR (TIES top-k)": lambda: lens.harm_removal(hv, cfg.lam),
            "HDR (task vector)": lambda: lens.harm_removal(self.hv_tv, cfg.tv_lam),
            "Safe-Align": lambda: lens.safety_alignment(SafetyVector.from_pairs(lens.model, self.pairs), cfg.alpha),
            # The ICV is read from θ̂ inside the HDR block, as the paper does (§3.2).
            "Safety Arithmetic": lambda: lens.safety_arithmetic(hv, self.pairs, cfg.lam, cfg.alpha),
        }
        return contexts[method]()

    def measure(self, scenario: str, method: str, cfg: LabConfig | None = None) -> tuple[dict, list[dict]]:
        """Evaluate one model state; returns its table row and its generation records."""
        cfg = cfg or self.cfg
        model = self.model(scenario)
        with self._context(method, cfg):
            res = evaluate_state(model, self.sets, batch_size=cfg.gen_batch_size, progress=f"{scenario} · {method}")
        records = [{"scenario": scenario, "method": method, **rec} for rec in res.records]
        return _row(scenario, method, res), records


def _row(scenario: str, method: str, res: StateResult) -> dict:
    row: dict = {"scenario": scenario, "method": method}
    for set_name, metrics in res.metrics.items():
        for metric, rate in metrics.items():
            key = metric if set_name in ("harmful", "safe", "qa") else f"{metric}_{set_name}"
            row[key] = rate.value
            row[f"{key}_n"] = rate.n
            row[f"{key}_ci95"] = [rate.low, rate.high]
    return row


def format_table(rows: list[dict], extra_sets: list[str], split: str) -> str:
    """The paper's Table 1/2 layout: one block per scenario, one line per method, values in %."""
    cols = [
        ("asr", "ASR ↓"),
        ("degenerate", "degen."),
        ("over_refusal", "over-refusal ↓"),
        ("over_refusal_contrast", "XSTest-style ↓"),
        ("utility", "utility ↑"),
    ]
    cols += [(f"asr_{s}", f"ASR {s} ↓") for s in extra_sets]
    lines = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        n = next(r for r in rows if r["scenario"] == scenario)
        lines.append(
            f"\n{scenario} scenario — {split} split (harmful n={n['asr_n']}, safe n={n['over_refusal_n']} of which "
            f"XSTest-style n={n['over_refusal_contrast_n']}, QA n={n['utility_n']}); keyword judge, greedy decoding"
        )
        header = f"{'Method':<20}" + "".join(f"{title:>17}" for _, title in cols)
        lines += [header, "-" * len(header)]
        for r in (r for r in rows if r["scenario"] == scenario):
            lines.append(f"{r['method']:<20}" + "".join(f"{100 * r[key]:>16.1f}%" for key, _ in cols))
    return "\n".join(lines)


def run_lab(cfg: LabConfig, out_dir: str | Path = "sa_lens_report", log: Callable[[str], None] = print) -> dict:
    """Run the lab end to end and write ``results.json``, ``generations.jsonl`` and ``methods.png``.

    Returns:
        The results dictionary written to ``results.json``.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    session = LabSession(cfg, log)
    t_models = time.perf_counter() - t0
    hv_ties = session.harm_vector(cfg.top_k)
    log(
        f"Harm vector: {session.hv_tv.numel:,} entries, {hv_ties.nnz:,} kept by the top-{cfg.top_k:.0%} trim; "
        f"{len(session.pairs)} ICV pairs."
    )
    rows, generations = [], []
    bar = tqdm([(s, m) for s in ("BASE", "SFT") for m in METHODS], desc="lab", unit="state")
    for scenario, method in bar:
        bar.set_postfix_str(f"{scenario} · {method}")
        row, records = session.measure(scenario, method)
        rows.append(row)
        generations += records
    sets, paths, pairs, hv_tv = session.sets, session.cast.paths, session.pairs, session.hv_tv
    extra = [s.name for s in sets[3:]]
    table = format_table(rows, extra, cfg.split)
    log(table)
    results = {
        "config": dataclasses.asdict(cfg),
        "models": {k: str(v) for k, v in paths.items()},
        "harm_vector": {"numel": hv_tv.numel, "nnz_trimmed": hv_ties.nnz},
        "icv_pairs": len(pairs),
        "rows": rows,
        "seconds": {"models": round(t_models, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    with (out / "generations.jsonl").open("w") as f:
        for g in generations:
            f.write(json.dumps(g) + "\n")
    plot_method_comparison(rows, out / "methods.png")
    log(f"\nReport written to {out.resolve()} (results.json, generations.jsonl, methods.png) in {results['seconds']['total']:.0f} s.")
    return results
