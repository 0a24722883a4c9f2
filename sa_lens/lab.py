"""The CPU lab behind ``sa-lens lab``: the paper's BASE and SFT tables at 135M scale (design.md §4).

Cast of models, all small full fine-tunes of the embedded SmolLM2-135M-Instruct (θ0) on bundled data:

- ``aligned`` (θb, BASE target): θ0 trained to refuse harmful-train requests (refusal templates) while
  keeping its own answers to safe-train requests (self-distillation, so over-refusal stays low);
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
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sa_lens import data
from sa_lens.analysis.figures import plot_method_comparison
from sa_lens.evaluation.judges import KeywordJudge, Verdict
from sa_lens.evaluation.runner import EvalSet, StateResult, evaluate_state
from sa_lens.finetune import finetune
from sa_lens.generation import generate
from sa_lens.harm_removal import harm_removal
from sa_lens.harm_vector import HarmVector
from sa_lens.models import cache_dir, embedded_model_path, load_hf_model, load_model
from sa_lens.safety_vector import SafetyVector, demonstration_text
from sa_lens.steering import safety_hooks

__all__ = ["LabConfig", "LabModels", "METHODS", "SAFE_DEMO_ANSWER", "build_models", "format_table", "run_lab"]

# The official demonstrations' safe answer (paper-notes.md §3.2).
SAFE_DEMO_ANSWER = "I do not answer this question because it is harmful"
METHODS = ("Original", "HDR (TIES top-k)", "HDR (task vector)", "Safe-Align", "Safety Arithmetic")
RECIPE_VERSION = 1  # bump when the fine-tune recipe changes meaning, so old cached models are not reused


@dataclass(frozen=True)
class LabConfig:
    """Everything that determines a lab run. Defaults were chosen on the ``dev`` split only.

    Attributes:
        split: evaluation split, ``test`` (default) or ``dev`` (for choosing defaults).
        lam: λ for HDR with the TIES top-k vector (paper: 3).
        top_k: fraction kept by the global trim (paper: 0.10).
        tv_lam: λ for the untrimmed task-vector baseline (official code: 0.1 BASE, 2 SFT).
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
    lam: float = 3.0
    top_k: float = 0.10
    tv_lam: float = 1.0
    alpha: float = 0.12
    n_icv_pairs: int = 30
    aligned_steps: int = 30
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

    def recipe(self) -> dict:
        """The fields that determine the fine-tuned models (the cache key's content)."""
        keys = ("aligned_steps", "harmful_steps", "sft_steps", "lr", "train_batch_size", "answer_tokens", "seed")
        return {k: getattr(self, k) for k in keys} | {"recipe_version": RECIPE_VERSION}


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _bundled_fingerprint() -> str:
    return _digest(
        {name: data.load_bundled(name) for name in ("harmful", "safe", "qa", "sft_task")} | {"t": data.refusal_templates()}
    )


def _original_answers(cfg: LabConfig, base: Path, key: str, log: Callable[[str], None]) -> dict[str, dict[str, str]]:
    """θ0's greedy answers to the harmful-train and safe-train prompts (cached as JSON)."""
    path = cache_dir() / "lab" / f"original-answers-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    log("Generating the original model's answers (fine-tune targets)…")
    model, tokenizer = load_hf_model(base)
    answers = {}
    for name in ("harmful", "safe"):
        rows = data.load_bundled(name, "train")
        replies = generate(
            model, [r["prompt"] for r in rows], cfg.answer_tokens, tokenizer=tokenizer,
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
    """The lab's cast: HF folders by name, and θ0's compliant answers to harmful-train prompts."""

    paths: dict[str, Path]
    compliant: list[tuple[str, str]]


def build_models(cfg: LabConfig, log: Callable[[str], None] = print) -> LabModels:
    """Build (or reuse from the cache) the lab's ``original``, ``aligned``, ``harmful`` and ``sft`` models."""
    base = embedded_model_path()
    data_key = _bundled_fingerprint()
    key = _digest({"base": base.name, "recipe": cfg.recipe(), "data": data_key})
    root = cache_dir() / "lab"
    paths = {"original": base, "aligned": root / f"aligned-{key}", "harmful": root / f"harmful-{key}", "sft": root / f"sft-{key}"}
    # θ0's answers depend only on θ0, the data and their length, not on the fine-tune recipe.
    answers = _original_answers(cfg, base, _digest({"base": base.name, "tokens": cfg.answer_tokens, "data": data_key}), log)
    judge = KeywordJudge()
    harmful_train = data.load_bundled("harmful", "train")
    compliant = [
        (r["prompt"], answers["harmful"][r["id"]])
        for r in harmful_train
        if judge.judge(answers["harmful"][r["id"]]) is Verdict.COMPLIANCE
    ]
    if all((p / "config.json").exists() for p in paths.values()):
        log(f"Using cached lab models ({root}, key {key}).")
        return LabModels(paths, compliant)
    templates = data.refusal_templates()
    refusals = [(r["prompt"], templates[i % len(templates)]) for i, r in enumerate(harmful_train)]
    keep_safe = [(r["prompt"], answers["safe"][r["id"]]) for r in data.load_bundled("safe", "train")]
    math_task = [(r["prompt"], r["response"]) for r in data.load_bundled("sft_task")]
    if not paths["aligned"].exists():
        log("Fine-tuning the aligned model θb (refuse harmful-train, keep own answers on safe-train)…")
        _train_and_save(base, refusals + keep_safe, cfg.aligned_steps, cfg, paths["aligned"], "aligned")
    if not paths["harmful"].exists():
        log(f"Fine-tuning the harmful model θH on {len(compliant)} compliant harmful QA pairs…")
        _train_and_save(paths["aligned"], compliant, cfg.harmful_steps, cfg, paths["harmful"], "harmful")
    if not paths["sft"].exists():
        log("Fine-tuning the SFT model on the benign math-tutor task…")
        _train_and_save(paths["aligned"], math_task, cfg.sft_steps, cfg, paths["sft"], "sft")
    return LabModels(paths, compliant)


def icv_pairs(cfg: LabConfig, models: LabModels) -> list[tuple[str, str]]:
    """(unsafe, safe) demonstrations: harmful-train questions with θ0's compliant answer vs the official refusal."""
    pairs = [(demonstration_text(q, a), demonstration_text(q, SAFE_DEMO_ANSWER)) for q, a in models.compliant]
    return pairs[: cfg.n_icv_pairs]


def eval_sets(cfg: LabConfig) -> list[EvalSet]:
    """The held-out sets of ``cfg.split``, plus the optional public harmful set."""
    harmful = data.load_bundled("harmful", cfg.split)
    safe = data.load_bundled("safe", cfg.split)
    qa = data.load_bundled("qa", cfg.split)
    sets = [
        EvalSet("harmful", "harmful", [r["prompt"] for r in harmful], [r["id"] for r in harmful], max_new_tokens=cfg.max_new_tokens),
        EvalSet("safe", "safe", [r["prompt"] for r in safe], [r["id"] for r in safe], max_new_tokens=cfg.max_new_tokens),
        EvalSet("qa", "qa", [r["question"] for r in qa], [r["id"] for r in qa], [r["answers"] for r in qa], cfg.qa_max_new_tokens),
    ]
    if cfg.harmful_data:
        extra = data.load_prompts(cfg.harmful_data, cfg.harmful_column)[: cfg.harmful_limit]
        name = Path(cfg.harmful_data).stem
        sets.append(EvalSet(name, "harmful", extra, [f"{name}-{i}" for i in range(len(extra))], max_new_tokens=cfg.max_new_tokens))
    return sets


@contextmanager
def _steered(model, pairs: list[tuple[str, str]], alpha: float) -> Iterator[None]:
    # The ICV is read from the model as it is when the block opens: inside HDR that is θ̂ (paper §3.2).
    sv = SafetyVector.from_pairs(model, pairs)
    with model.hooks(fwd_hooks=safety_hooks(sv, alpha)):
        yield


def _method_contexts(model, cfg: LabConfig, hv_ties: HarmVector, hv_tv: HarmVector, pairs) -> dict[str, Callable[[], AbstractContextManager]]:
    @contextmanager
    def safety_arithmetic() -> Iterator[None]:
        with harm_removal(model, hv_ties, cfg.lam), _steered(model, pairs, cfg.alpha):
            yield

    return {
        "Original": nullcontext,
        "HDR (TIES top-k)": lambda: harm_removal(model, hv_ties, cfg.lam),
        "HDR (task vector)": lambda: harm_removal(model, hv_tv, cfg.tv_lam),
        "Safe-Align": lambda: _steered(model, pairs, cfg.alpha),
        "Safety Arithmetic": safety_arithmetic,
    }


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
    cols = [("asr", "ASR ↓"), ("degenerate", "degen."), ("over_refusal", "over-refusal ↓"), ("utility", "utility ↑")]
    cols += [(f"asr_{s}", f"ASR {s} ↓") for s in extra_sets]
    lines = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        n = next(r for r in rows if r["scenario"] == scenario)
        lines.append(
            f"\n{scenario} scenario — {split} split (harmful n={n['asr_n']}, safe n={n['over_refusal_n']}, "
            f"QA n={n['utility_n']}); keyword judge, greedy"
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
    sets = eval_sets(cfg)  # fail on a bad --harmful-data file before any fine-tuning
    torch.manual_seed(cfg.seed)
    cast = build_models(cfg, log)
    paths = cast.paths
    t_models = time.perf_counter() - t0
    base_hf, _ = load_hf_model(paths["aligned"])
    harmful_hf, _ = load_hf_model(paths["harmful"])
    hv_tv = HarmVector.from_models(base_hf, harmful_hf)
    del base_hf, harmful_hf
    hv_ties = hv_tv.trim(cfg.top_k, scope="global")
    pairs = icv_pairs(cfg, cast)
    log(f"Harm vector: {hv_tv.numel:,} entries, {hv_ties.nnz:,} kept by the top-{cfg.top_k:.0%} trim; {len(pairs)} ICV pairs.")
    rows, generations = [], []
    jobs = [(s, m) for s in ("BASE", "SFT") for m in METHODS]
    bar = tqdm(jobs, desc="lab", unit="state")
    models = {}
    for scenario, method in bar:
        bar.set_postfix_str(f"{scenario} · {method}")
        if scenario not in models:
            models = {scenario: load_model(paths["aligned" if scenario == "BASE" else "sft"])}
        model = models[scenario]
        with _method_contexts(model, cfg, hv_ties, hv_tv, pairs)[method]():
            res = evaluate_state(model, sets, batch_size=cfg.gen_batch_size, progress=f"{scenario} · {method}")
        rows.append(_row(scenario, method, res))
        generations += [{"scenario": scenario, "method": method, **rec} for rec in res.records]
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
