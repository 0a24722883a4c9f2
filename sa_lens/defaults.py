"""The method's default settings, each stated once with its source (paper-notes.md §2, §3, §7).

Every signature and CLI option that takes λ, top-k or α defaults to these; the lab overrides them with values
chosen on its dev split (see :class:`sa_lens.lab.LabConfig`), and says so.
"""

from __future__ import annotations

__all__ = ["DEFAULT_ALPHA", "DEFAULT_LAM", "DEFAULT_TOP_K"]

DEFAULT_LAM: float = 3.0
"""λ of HDR, θ̂ = θt − λ·τH′ (paper Eq. 4 and A.6: λ = 3 for BASE and SFT)."""

DEFAULT_TOP_K: float = 0.10
"""Fraction of τH's entries kept by the global magnitude trim (paper §3.1 and A.6: top 10 %)."""

DEFAULT_ALPHA: float = 0.12
"""α of Safe-Align (paper A.6 and the official notebooks); the official formula multiplies it by 0.1 more."""
