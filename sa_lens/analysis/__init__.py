"""Figures built from evaluation results."""

from __future__ import annotations

from sa_lens.analysis.figures import plot_method_comparison

__all__ = ["plot_method_comparison"]
