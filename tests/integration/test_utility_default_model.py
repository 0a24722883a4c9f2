"""Utility on the embedded SmolLM2-135M-Instruct: the built-in scorer equals lm-eval's HFLM item by item.

Kept small for CI (90 s on 2 CPU threads): the first 4 questions, 5-shot, of the 6 MMLU subjects with
the shortest prompts, and the first 4 TruthfulQA questions for MC1 and MC2 (the full measurement, 228 MMLU
questions over all subjects, is analyses/utility_parity.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import sa_lens
from sa_lens.evaluation.utility import parity, utility

# A checkout beside ../shared/data finds the copies; elsewhere point $SA_LENS_SHARED_DATA at them.
SHARED = Path(os.environ.get("SA_LENS_SHARED_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")
SUBJECTS = ("anatomy", "conceptual_physics", "human_aging", "management", "medical_genetics", "world_religions")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED.is_dir(), reason=f"public data copies not found at {SHARED}"),
]


def test_builtin_scorer_equals_lm_eval_on_the_default_model(tmp_path):
    pytest.importorskip("lm_eval")
    for split in ("dev", "test"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        for subject in SUBJECTS:
            shutil.copy(SHARED / "mmlu" / split / f"{subject}_{split}.csv", tmp_path / "mmlu" / split)
    shutil.copytree(SHARED / "truthfulqa", tmp_path / "truthfulqa")
    model = sa_lens.load_model()
    kwargs = dict(tasks=["mmlu", "truthfulqa"], data_dir=tmp_path, limit=4)
    table = parity(utility(model, **kwargs), utility(model, engine="builtin", **kwargs))
    assert {task: row["n"] for task, row in table.items()} == {"mmlu": 24, "truthfulqa_mc1": 4, "truthfulqa_mc2": 4}
    for task, row in table.items():
        assert row["max_abs_delta"] <= 1e-4 and row["score_disagreements"] == 0, (task, row)
