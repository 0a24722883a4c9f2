"""The one test every numeric option of sa_lens starts with; each caller adds its own range and message."""

from __future__ import annotations

import math
import numbers

__all__ = ["is_finite_real"]


def is_finite_real(value: object) -> bool:
    """True for a finite real number — Python or numpy scalar — and False for bools, NaN, ±inf and non-numbers.

    Bools are refused because ``True`` passed as λ or α is almost always a misplaced flag, not the number 1.
    """
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
