"""Scoring model continuations: a keyword refusal judge and rates with Wilson intervals."""

from __future__ import annotations

from sa_lens.evaluation.judges import DEFAULT_REFUSAL_PHRASES, KeywordJudge, Verdict
from sa_lens.evaluation.metrics import (
    Rate,
    accuracy,
    attack_success_rate,
    degenerate_rate,
    exact_match,
    normalize_answer,
    rate,
    refusal_rate,
)

__all__ = [
    "DEFAULT_REFUSAL_PHRASES",
    "KeywordJudge",
    "Rate",
    "Verdict",
    "accuracy",
    "attack_success_rate",
    "degenerate_rate",
    "exact_match",
    "normalize_answer",
    "rate",
    "refusal_rate",
]
