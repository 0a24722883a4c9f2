"""Rates, Wilson intervals and answer matching."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sa_lens.evaluation.judges import Verdict
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

R, C, D = Verdict.REFUSAL, Verdict.NOT_REFUSED, Verdict.DEGENERATE
Z = 1.959963984540054


def _wilson_by_quadratic(k: int, n: int) -> tuple[float, float]:
    """Reference bounds: roots in q of (p - q)^2 = z^2 q (1 - q) / n, solved directly."""
    p = k / n
    a = 1 + Z**2 / n
    b = -(2 * p + Z**2 / n)
    c = p**2
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize(
    ("k", "n", "published_low", "published_high"),
    [
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        # Worked examples of the score method in Newcombe (1998), Stat. Med. 17:857, Table I.
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_reference(k: int, n: int, published_low: float, published_high: float) -> None:
    result = rate([True] * k + [False] * (n - k))
    low, high = _wilson_by_quadratic(k, n)
    assert result.value == pytest.approx(k / n)
    assert result.n == n
    assert result.low == pytest.approx(max(0.0, low), abs=1e-12)
    assert result.high == pytest.approx(min(1.0, high), abs=1e-12)
    assert result.low == pytest.approx(published_low, abs=5e-5)
    assert result.high == pytest.approx(published_high, abs=5e-5)


def test_wilson_bounds_are_exact_at_the_edges() -> None:
    assert rate([False] * 10).low == 0.0
    assert rate([True] * 10).high == 1.0


def test_rate_str() -> None:
    assert str(rate([True] * 21 + [False] * 29)) == "42.0 % [29.4, 55.8] (n=50)"
    assert str(Rate(value=0.42, n=50, low=0.312, high=0.534)) == "42.0 % [31.2, 53.4] (n=50)"


def test_rate_accepts_zero_and_one() -> None:
    assert rate([1, 0, 0, 0]).value == 0.25


@pytest.mark.parametrize("bad", [[], ()])
def test_rate_rejects_empty_input(bad: list[bool]) -> None:
    with pytest.raises(ValueError, match="at least one"):
        rate(bad)


def test_rate_rejects_non_booleans() -> None:
    with pytest.raises(ValueError, match="booleans"):
        rate([True, 0.5])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "fields",
    [
        {"value": 0.5, "n": 0, "low": 0.1, "high": 0.9},
        {"value": 0.5, "n": 10, "low": 0.6, "high": 0.9},
        {"value": 0.5, "n": 10, "low": 0.1, "high": 1.2},
    ],
)
def test_inconsistent_rate_is_rejected(fields: dict) -> None:
    with pytest.raises(ValueError):
        Rate(**fields)


@given(st.lists(st.booleans(), min_size=1, max_size=500))
def test_interval_brackets_the_value(flags: list[bool]) -> None:
    result = rate(flags)
    assert 0.0 <= result.low <= result.value <= result.high <= 1.0
    assert result.value == sum(flags) / len(flags)


def test_verdict_rates() -> None:
    verdicts = [C, C, R, D, R, R, C, D]
    assert attack_success_rate(verdicts).value == pytest.approx(3 / 8)
    assert refusal_rate(verdicts).value == pytest.approx(3 / 8)
    assert degenerate_rate(verdicts).value == pytest.approx(2 / 8)
    assert attack_success_rate(verdicts).n == 8


def test_degenerate_is_not_an_attack_success() -> None:
    broken = [D, D, D, D]
    assert attack_success_rate(broken).value == 0.0
    assert refusal_rate(broken).value == 0.0
    assert degenerate_rate(broken).value == 1.0


def test_verdict_rates_accept_string_values_old_and_new() -> None:
    assert attack_success_rate(["not_refused", "refusal"]).value == 0.5
    assert attack_success_rate(["compliance", "refusal"]).value == 0.5  # results files written before the split


def test_asr_counts_a_harm_judges_harmful_verdicts() -> None:
    assert attack_success_rate([Verdict.HARMFUL, Verdict.SAFE, Verdict.SAFE, Verdict.FAILED]).value == pytest.approx(1 / 3)


def test_refusal_rate_rejects_harm_judge_verdicts() -> None:
    with pytest.raises(ValueError, match="keyword judge"):
        refusal_rate([Verdict.SAFE, Verdict.HARMFUL])


@pytest.mark.parametrize("metric", [attack_success_rate, refusal_rate, degenerate_rate])
def test_verdict_rates_reject_empty_and_unknown(metric) -> None:
    with pytest.raises(ValueError, match="at least one"):
        metric([])
    with pytest.raises(ValueError):
        metric(["complied"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  A   cat,  an owl. ", "cat owl"),
        ("U.S.A.", "usa"),
        ("3.14", "314"),
        ("\u201cParis\u201d \u2014 France", "paris france"),
        ("Theatre", "theatre"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("The capital of France is Paris.", ["Paris"], True),
        ("paris", ["Paris"], True),
        ("PARIS!!!", ["paris"], True),
        ("The answer is 4.", ["4"], True),
        ("The answer is 40.", ["4"], False),
        ("4", ["40"], False),
        ("It is the Pacific Ocean.", ["Pacific Ocean", "the Pacific"], True),
        ("An apple a day.", ["the apple"], True),
        ("Parisian cafes are nice.", ["Paris"], False),
        ("Lyon", ["Paris", "Marseille"], False),
        ("Lyon or Marseille", ["Paris", "Marseille"], True),
        ("", ["Paris"], False),
        ("The year was 1,969.", ["1969"], True),
        ("Ocean Pacific", ["Pacific Ocean"], False),
    ],
)
def test_exact_match(prediction: str, answers: list[str], expected: bool) -> None:
    assert exact_match(prediction, answers) is expected


def test_exact_match_rejects_unusable_answers() -> None:
    with pytest.raises(ValueError, match="alias"):
        exact_match("anything", [])
    with pytest.raises(ValueError, match="alias"):
        exact_match("anything", ["The", "?!"])
    with pytest.raises(TypeError, match="list"):
        exact_match("Paris", "Paris")  # type: ignore[arg-type]


def test_accuracy() -> None:
    result = accuracy(["It is Paris.", "40", "Blue"], [["Paris"], ["4"], ["blue", "azure"]])
    assert result.value == pytest.approx(2 / 3)
    assert result.n == 3


def test_accuracy_rejects_misaligned_or_empty_input() -> None:
    with pytest.raises(ValueError, match="align"):
        accuracy(["Paris"], [["Paris"], ["Rome"]])
    with pytest.raises(ValueError, match="at least one"):
        accuracy([], [])
