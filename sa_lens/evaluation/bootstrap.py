"""Seeded percentile-bootstrap 95 % intervals for item means and macro-averages over categories.

Every headline number of an evaluation (ASR, macro ASR, over-refusal, multiple-choice accuracy, MC2
score) is a mean of per-item scores in [0, 1]; the bootstrap gives one interval recipe for all of them,
including the macro-average over categories that the paper reports for HarmfulQA and NicheHazardQA
(paper-notes.md §4.1), for which no closed form like Wilson's exists. Resampling is stratified by
category for the macro-average, so every resample keeps every category.

Limit, stated where the numbers are read: at 0 % or 100 % (every item alike) every resample is the same, so the
interval collapses to the point; a binomial interval (Wilson) would still give [0, 3/n]-ish width there. Read
n beside such a value: 0 of 20 is compatible with a true rate up to about 16 %.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sa_lens.errors import InputError

__all__ = ["Rate", "bootstrap_mean", "macro_mean", "weighted_group_mean"]


@dataclass(frozen=True)
class Rate:
    """A fraction in [0, 1] with its 95 % interval (seeded percentile bootstrap, :func:`bootstrap_mean`).

    Attributes:
        value: Observed share k / n, in [0, 1].
        n: Number of items the share is taken over (at least 1).
        low: Lower bound of the 95 % interval, in [0, value].
        high: Upper bound of the 95 % interval, in [value, 1].
    """

    value: float
    n: int
    low: float
    high: float

    def __post_init__(self) -> None:
        """Rejects inconsistent rates.

        Raises:
            ValueError: If n < 1 or the bounds do not satisfy 0 <= low <= value <= high <= 1.
        """
        if self.n < 1:
            raise InputError(f"a Rate needs n >= 1, got n={self.n}")
        if not 0.0 <= self.low <= self.value <= self.high <= 1.0:
            raise InputError(
                f"a Rate needs 0 <= low <= value <= high <= 1, got low={self.low}, value={self.value}, high={self.high}"
            )

    def __str__(self) -> str:
        """Formats as percent with the interval, e.g. ``42.0 % [31.2, 53.4] (n=50)``."""
        return f"{100 * self.value:.1f} % [{100 * self.low:.1f}, {100 * self.high:.1f}] (n={self.n})"


def _check(values: Sequence[float], n_boot: int) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise InputError("the bootstrap needs a non-empty 1-d sequence of per-item scores.")
    if not np.all((x >= 0) & (x <= 1)):
        raise InputError("per-item scores must lie in [0, 1] (flags or probabilities).")
    if n_boot < 100:
        raise InputError(f"n_boot must be ≥ 100 for a 95 % percentile interval, got {n_boot}.")
    return x


def bootstrap_mean(values: Sequence[float], n_boot: int = 2000, seed: int = 0) -> Rate:
    """Mean of per-item scores with a seeded percentile-bootstrap 95 % interval.

    Args:
        values: one score per item in [0, 1] (a flag such as "complied", or a probability such as MC2's).
        n_boot: bootstrap resamples (≥ 100).
        seed: seed of the resampling; the same inputs and seed give the same interval.

    Returns:
        A :class:`Rate`: value = the mean, [low, high] = the 2.5th and 97.5th percentiles of the resampled
        means (widened to include the mean), n = number of items.

    Raises:
        ValueError: empty input, a score outside [0, 1], or n_boot < 100.
    """
    x = _check(values, n_boot)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return _rate(float(x.mean()), means, x.size)


def macro_mean(values: Sequence[float], groups: Sequence[str], n_boot: int = 2000, seed: int = 0) -> Rate:
    """Unweighted mean over categories of the per-category mean score, with a stratified bootstrap interval.

    The paper's HarmfulQA and NicheHazardQA ASR (paper-notes.md §4.1: 31.553 is the macro, not the micro
    31.19 over items). Resampling draws items with replacement within each category.

    Args:
        values: one score per item in [0, 1].
        groups: the category of each item.
        n_boot: bootstrap resamples (≥ 100).
        seed: seed of the resampling.

    Returns:
        A :class:`Rate` whose n is the number of items (the number of categories is ``len(set(groups))``).

    Raises:
        ValueError: as :func:`bootstrap_mean`, or ``groups`` not aligned with ``values``.
    """
    return weighted_group_mean(values, groups, {g: 1.0 for g in groups}, n_boot, seed)


def weighted_group_mean(values: Sequence[float], groups: Sequence[str], weights: Mapping[str, float],
                        n_boot: int = 2000, seed: int = 0) -> Rate:
    """Σ_g w_g · (mean score of group g) / Σ_g w_g, with a bootstrap that resamples items within each group.

    :func:`macro_mean` is the equal-weight case. Unequal weights express a mean of means of means: the mean over
    harm sources of each source's headline, where one source is itself a macro over its categories (weight
    1 / (sources × that source's categories) per category).

    Args:
        values: one score per item in [0, 1].
        groups: the group of each item.
        weights: group → weight > 0, for every group present.
        n_boot: bootstrap resamples (≥ 100).
        seed: seed of the resampling.

    Returns:
        A :class:`Rate` whose n is the number of items.

    Raises:
        ValueError: as :func:`bootstrap_mean`, ``groups`` not aligned with ``values``, or a group without a
            positive weight.
    """
    x = _check(values, n_boot)
    if len(groups) != x.size:
        raise InputError(f"{len(groups)} groups for {x.size} values; give one category per item.")
    order = list(dict.fromkeys(groups))
    if any(not weights.get(g, 0) > 0 for g in order):
        raise InputError("every group needs a positive weight; got " + str({g: weights.get(g) for g in order}) + ".")
    w = np.asarray([weights[g] for g in order], dtype=np.float64)
    w /= w.sum()
    rng = np.random.default_rng(seed)
    labels = np.asarray(groups, dtype=object)
    per_group, boot = [], []
    for g in order:
        xg = x[labels == g]
        per_group.append(xg.mean())
        boot.append(xg[rng.integers(0, xg.size, size=(n_boot, xg.size))].mean(axis=1))
    return _rate(float(np.dot(w, per_group)), np.tensordot(w, np.asarray(boot), axes=1), x.size)


def _rate(value: float, resampled: np.ndarray, n: int) -> Rate:
    low, high = np.percentile(resampled, [2.5, 97.5])
    # Percentiles can miss the point estimate by float error (all-equal scores); keep low ≤ value ≤ high.
    return Rate(value=value, n=n, low=float(min(low, value)), high=float(max(high, value)))
