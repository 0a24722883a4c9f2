"""Where the harm lives: head tracing, τH per head, layer-wise ablations, figures and views."""

from __future__ import annotations

from sa_lens.analysis.figures import plot_method_comparison
from sa_lens.analysis.heads import top_heads, trace_heads

__all__ = ["plot_method_comparison", "top_heads", "trace_heads"]
