"""The built-in multiple-choice scorer against lm-eval-harness on the embedded model: per-item Δ, accuracy, time.

Runs :func:`sa_lens.evaluation.utility.utility` twice over the same questions — ``engine="lm_eval"`` (lm-eval's
``HFLM`` and task configs, local data handed over) and ``engine="builtin"`` (:mod:`sa_lens.evaluation.multiple_choice`)
— on SmolLM2-135M-Instruct through its bridge (the checkpoint's own tokenizer, which adds no BOS, as
``lm_eval --model hf`` reads it), and writes per task the
largest |Δ| of an option's log-likelihood, the questions whose score differs, both accuracies and both run times.

Subset (fixed, no sampling): MMLU 5-shot, the first ``--mmlu-per-subject`` test questions (default 4; lm-eval's
``limit``) of every subject but the ``--exclude``d ones (default: the 7 whose 5-shot prompts are longest, 1,000 to
3,000 tokens — on 2 shared CPU cores the 57-subject run took over an hour per engine), so 50 × 4 = 200 questions;
TruthfulQA MC1 and MC2, the first ``--truthfulqa``
questions of ``mc_task.json`` (default 10; the 790-question 2025 revision, not the hub's 817).

Usage: ``python analyses/utility_parity.py [--data-dir ../shared/data] [--mmlu-per-subject 4] [--truthfulqa 10]
[--exclude SUBJECT ...]``.
Writes ``analyses/results/utility_parity/utility_parity.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

import sa_lens
from sa_lens.evaluation.harness import state_fingerprint
from sa_lens.evaluation.utility import parity, utility
from sa_lens.provenance import model_name, portable_name

RESULTS = Path(__file__).parent / "results" / "utility_parity" / "utility_parity.json"
LONGEST = ("high_school_european_history", "high_school_us_history", "professional_law", "high_school_world_history",
           "security_studies", "professional_medicine", "high_school_computer_science")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _subset(data_dir: Path, exclude: set[str], into: Path) -> Path:
    """A data folder holding every MMLU subject but ``exclude`` and the TruthfulQA copy."""
    for split in ("dev", "test"):
        (into / "mmlu" / split).mkdir(parents=True)
        for file in sorted((data_dir / "mmlu" / split).glob("*.csv")):
            if file.stem.removesuffix(f"_{split}") not in exclude:
                shutil.copy(file, into / "mmlu" / split)
    shutil.copytree(data_dir / "truthfulqa", into / "truthfulqa")
    return into


def _run(model, data_dir: Path, mmlu_limit: int, tqa_limit: int) -> dict:
    runs = {}
    for engine in ("lm_eval", "builtin"):
        mmlu = utility(model, ["mmlu"], data_dir=data_dir, limit=mmlu_limit, engine=engine)
        tqa = utility(model, ["truthfulqa"], data_dir=data_dir, limit=tqa_limit, engine=engine)
        runs[engine] = (mmlu, tqa)
    out = {}
    for k, name in enumerate(("mmlu", "truthfulqa")):
        lm, builtin = runs["lm_eval"][k], runs["builtin"][k]
        for task, row in parity(lm, builtin).items():
            out[task] = {
                "n": row["n"],
                "max_abs_delta_nats": row["max_abs_delta"],
                "score_disagreements": row["score_disagreements"],
                "acc_lm_eval": row["acc_a"],
                "acc_builtin": row["acc_b"],
                "ci95_lm_eval": [lm.tasks[task]["acc"].low, lm.tasks[task]["acc"].high],
            }
        # lm-eval's time includes indexing its task YAMLs once (about 9 s), in the MMLU run.
        out[f"{name}_seconds"] = {"lm_eval": lm.config["seconds"], "builtin": builtin.config["seconds"],
                                  "builtin_over_lm_eval": round(builtin.config["seconds"] / lm.config["seconds"], 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=SHARED, help="folder with mmlu/ and truthfulqa/ copies")
    parser.add_argument("--mmlu-per-subject", type=int, default=4)
    parser.add_argument("--truthfulqa", type=int, default=10)
    parser.add_argument("--exclude", nargs="*", default=list(LONGEST), help="MMLU subjects left out")
    args = parser.parse_args()
    model = sa_lens.load_model()
    with tempfile.TemporaryDirectory() as tmp:
        data = _subset(args.data_dir, set(args.exclude), Path(tmp))
        results = _run(model, data, args.mmlu_per_subject, args.truthfulqa)
    doc = {
        "model": model_name(model),
        "weights_fingerprint": state_fingerprint(model),
        "tokenizer": "the checkpoint's own (adds no BOS), as lm_eval --model hf",
        "subset": {"mmlu": f"first {args.mmlu_per_subject} test questions of each subject, 5-shot (first 5 dev)",
                   "mmlu_subjects_excluded": sorted(args.exclude),
                   "truthfulqa": f"first {args.truthfulqa} questions of mc_task.json, MC1 and MC2, 0-shot + primer"},
        "data": portable_name(args.data_dir),
        "machine": {"threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "python": platform.python_version(), "torch": torch.__version__, "lm_eval": version("lm_eval")},
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
