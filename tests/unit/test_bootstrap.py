"""Seeded bootstrap intervals and the macro-average over categories."""

from __future__ import annotations

import pytest

from sa_lens.evaluation.bootstrap import bootstrap_mean, macro_mean


def test_same_seed_same_interval_and_interval_contains_value():
    x = [1, 0, 0, 1, 1, 0, 1, 1, 1, 0] * 5
    a, b = bootstrap_mean(x, seed=1), bootstrap_mean(x, seed=1)
    assert a == b and a.low <= a.value <= a.high and a.n == 50 and a.value == pytest.approx(0.6)
    assert bootstrap_mean(x, seed=2) != a
    assert 0.4 < a.low < 0.6 < a.high < 0.8


def test_macro_differs_from_micro_when_categories_are_unbalanced():
    values = [1] * 10 + [0] * 2  # category a: 10/10, category b: 0/2
    groups = ["a"] * 10 + ["b"] * 2
    assert macro_mean(values, groups).value == pytest.approx(0.5)
    assert bootstrap_mean(values).value == pytest.approx(10 / 12)
    # Stratified resampling keeps both categories in every resample: the macro value cannot move here.
    r = macro_mean(values, groups)
    assert (r.low, r.high) == (0.5, 0.5)


def test_scores_outside_unit_interval_and_empty_input_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bootstrap_mean([0.5, 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="one category per item"):
        macro_mean([1, 0], ["a"])
