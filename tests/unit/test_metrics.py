"""Rates, their bootstrap intervals and answer matching."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sa_lens.evaluation.bootstrap import bootstrap_mean
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


def test_rate_is_the_bootstrap_interval_every_report_uses() -> None:
    flags = [True] * 21 + [False] * 29
    assert rate(flags) == bootstrap_mean([float(f) for f in flags])
    assert str(rate(flags)) == str(bootstrap_mean([float(f) for f in flags]))
    assert rate(flags).value == pytest.approx(0.42) and rate(flags).low < 0.42 < rate(flags).high


def test_rate_str() -> None:
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


def test_verdict_rates_leave_degenerate_replies_out_of_n() -> None:
    verdicts = [C, C, R, D, R, R, C, D]
    assert attack_success_rate(verdicts).value == pytest.approx(3 / 6)
    assert refusal_rate(verdicts).value == pytest.approx(3 / 6)
    assert attack_success_rate(verdicts).n == refusal_rate(verdicts).n == 6
    assert degenerate_rate(verdicts).value == pytest.approx(2 / 8)
    assert degenerate_rate(verdicts).n == 8


def test_all_degenerate_replies_have_no_asr_rather_than_asr_zero() -> None:
    broken = [D, D, D, D]
    for metric in (attack_success_rate, refusal_rate):
        with pytest.raises(ValueError, match="every reply is degenerate"):
            metric(broken)
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
