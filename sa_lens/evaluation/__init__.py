"""Scoring model continuations: judges (keyword, LLM, classifiers, over-refusal), metrics, the resumable harness."""

from __future__ import annotations

from sa_lens.evaluation.bootstrap import bootstrap_mean, macro_mean
from sa_lens.evaluation.decoding import PRESETS, GenerationSettings, preset
from sa_lens.evaluation.harness import EvalReport, evaluate, load_sets
from sa_lens.evaluation.judge_registry import JUDGES, get_judge
from sa_lens.evaluation.judges import DEFAULT_REFUSAL_PHRASES, KeywordJudge, Verdict
from sa_lens.evaluation.metrics import (
    Rate,
    accuracy,
    attack_success_rate,
    degenerate_rate,
    exact_match,
    failed_count,
    normalize_answer,
    rate,
    refusal_rate,
)
from sa_lens.evaluation.over_refusal import OverRefusalJudge, RefusalClass
from sa_lens.evaluation.states import STATE_NAMES, safety_arithmetic_states

# The function, as the docs call it (sal.evaluation.utility(...)); the module stays importable by its full path
# (from sa_lens.evaluation.utility import UtilityReport), lm-eval is imported only when it runs.
from sa_lens.evaluation.utility import UtilityReport, parity, utility

__all__ = [
    "DEFAULT_REFUSAL_PHRASES",
    "JUDGES",
    "PRESETS",
    "STATE_NAMES",
    "EvalReport",
    "GenerationSettings",
    "KeywordJudge",
    "OverRefusalJudge",
    "Rate",
    "RefusalClass",
    "UtilityReport",
    "Verdict",
    "accuracy",
    "attack_success_rate",
    "bootstrap_mean",
    "degenerate_rate",
    "evaluate",
    "exact_match",
    "failed_count",
    "get_judge",
    "load_sets",
    "macro_mean",
    "normalize_answer",
    "parity",
    "preset",
    "safety_arithmetic_states",
    "rate",
    "refusal_rate",
    "utility",
]
