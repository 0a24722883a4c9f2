"""Where the harm lives: head tracing, τH per head, layer-wise ablations, figures and views.

The names below load on first use (PEP 562): ``import sa_lens`` must not pay for pandas and matplotlib, which
only analysis needs. ``from sa_lens.analysis import trace_heads`` imports :mod:`sa_lens.analysis.heads` alone.
"""

from __future__ import annotations

import importlib

# Exported name -> the submodule that defines it; add a line here to export another.
_EXPORTS = {
    "plot_method_comparison": "sa_lens.analysis.figures",
    "top_heads": "sa_lens.analysis.heads",
    "trace_heads": "sa_lens.analysis.heads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
