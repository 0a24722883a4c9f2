"""The shared numeric test behind λ, α, top_k, DARE's p and the lab options."""

from __future__ import annotations

import numpy as np
import pytest

from sa_lens.validation import is_finite_real


@pytest.mark.parametrize("value", [0, 3, -0.5, 1e-30, np.float32(0.1), np.int64(2)])
def test_finite_reals_pass(value):
    assert is_finite_real(value)


@pytest.mark.parametrize("value", [True, False, float("nan"), float("inf"), -float("inf"), np.float64("nan"), "3", None, 1j])
def test_bools_non_finite_and_non_numbers_fail(value):
    assert not is_finite_real(value)
