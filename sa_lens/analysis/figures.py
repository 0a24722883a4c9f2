"""Publication figure comparing safety methods across scenarios.

Draws on a bare ``matplotlib.figure.Figure`` rather than through ``pyplot``, so it works
under any backend (including ``Agg`` on headless machines), never opens a window, and
leaves no figure registered with pyplot after saving.
"""

from __future__ import annotations

import numbers
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

__all__ = ["plot_method_comparison"]

# (row key, panel title); the arrow says which direction is better.
_METRICS: tuple[tuple[str, str], ...] = (
    ("asr", "Attack success rate ↓"),
    ("over_refusal", "Over-refusal ↓"),
    ("utility", "Utility ↑"),
)
# Drawn as a fourth panel only when every row has it, so a method that "wins" on ASR by
# breaking the model shows its degenerate-output rate right next to it.
_DEGENERATE: tuple[str, str] = ("degenerate", "Degenerate output ↓")

_PALETTE = colormaps["tab10"].colors
_DPI = 200
_PANEL_SIZE_IN = (4.6, 3.6)
# Axis tops in percent: room above a 100 % bar for its value label.
_Y_TOP_FLAT_LABELS = 112
_Y_TOP_VERTICAL_LABELS = 125
# Widest bar, as a share of a scenario slot, so a lone method is not one slab.
_MAX_BAR_WIDTH = 0.35
# Scenario names wrap at this many characters per panel, split between the scenarios.
_TICK_CHARS_PER_PANEL = 40
# Value labels turn vertical once bars get narrower than this share of a scenario slot.
_MIN_BAR_WIDTH_FOR_FLAT_LABELS = 0.25
# Legend entries per line before it wraps, so ten long method names stay inside the figure.
_MAX_LEGEND_COLUMNS = 6


def _check_rows(rows: Sequence[Mapping], metric_keys: Sequence[str]) -> None:
    """Validates that every row has a scenario, a method and ``metric_keys`` in [0, 1].

    Raises:
        ValueError: On a missing key, a metric that is not a number in [0, 1], or two rows
            for the same (scenario, method).
    """
    required = ["scenario", "method", *metric_keys]
    seen: set[tuple[str, str]] = set()
    for index, row in enumerate(rows):
        for key in required:
            if key not in row:
                raise ValueError(f"row {index} lacks the key {key!r}; every row needs {required}")
        for key in metric_keys:
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"row {index} has {key}={value!r}; metrics must be fractions in [0, 1], not percent"
                )
        pair = (str(row["scenario"]), str(row["method"]))
        if pair in seen:
            raise ValueError(f"two rows for scenario {pair[0]!r} and method {pair[1]!r}; keep one per pair")
        seen.add(pair)


def _first_seen(rows: Sequence[Mapping], key: str) -> list[str]:
    """Distinct values of ``key`` in order of first appearance."""
    return list(dict.fromkeys(str(row[key]) for row in rows))


def plot_method_comparison(
    rows: Sequence[Mapping],
    path: str | Path,
    title: str = "Safety methods compared across scenarios",
) -> Path:
    """Saves grouped bar charts of ASR, over-refusal and utility per scenario and method.

    One panel per metric; x is the scenario, one bar colour per method (in the order the
    methods first appear in ``rows``), y is percent from 0 to 100 with the value written
    on each bar. When every row also has a ``"degenerate"`` key, a fourth panel shows the
    degenerate-output rate, which ASR alone hides (see
    ``sa_lens.evaluation.attack_success_rate``). A (scenario, method) pair with no row
    is left as a gap. Other keys are ignored.

    Args:
        rows: Mappings with ``"scenario"``, ``"method"``, and ``"asr"``,
            ``"over_refusal"``, ``"utility"`` as fractions in [0, 1] (optionally
            ``"degenerate"``, also a fraction).
        path: Output file, written exactly there; the format follows its suffix
            (``.png`` for the paper figure, saved at 200 dpi; PNG when there is no
            suffix). Missing parent folders are created.
        title: Figure title.

    Returns:
        The path written, as a ``Path``.

    Raises:
        ValueError: If ``rows`` is empty, a row lacks a required key (the key is named),
            a metric is not a fraction in [0, 1], a (scenario, method) pair repeats,
            there are more methods than distinguishable colours (10), or matplotlib
            does not support the suffix of ``path``.
    """
    if not rows:
        raise ValueError("plot_method_comparison() got no rows; pass one mapping per (scenario, method)")
    metrics = [*_METRICS, _DEGENERATE] if all(_DEGENERATE[0] in row for row in rows) else list(_METRICS)
    _check_rows(rows, [key for key, _ in metrics])

    scenarios = _first_seen(rows, "scenario")
    methods = _first_seen(rows, "method")
    if len(methods) > len(_PALETTE):
        raise ValueError(f"{len(methods)} methods exceed the {len(_PALETTE)} distinguishable colours; split the figure")
    values = {(str(row["scenario"]), str(row["method"])): row for row in rows}

    bar_width = min(0.8 / len(methods), _MAX_BAR_WIDTH)
    vertical_labels = bar_width < _MIN_BAR_WIDTH_FOR_FLAT_LABELS
    wrap_width = max(8, _TICK_CHARS_PER_PANEL // len(scenarios))
    tick_labels = [textwrap.fill(scenario, wrap_width) for scenario in scenarios]
    figure = Figure(
        figsize=(_PANEL_SIZE_IN[0] * len(metrics), _PANEL_SIZE_IN[1] + 0.9),
        layout="constrained",
    )
    axes = figure.subplots(1, len(metrics), sharey=True)
    for ax, (key, panel_title) in zip(axes, metrics, strict=True):
        for m, method in enumerate(methods):
            offset = (m - (len(methods) - 1) / 2) * bar_width
            xs, heights = [], []
            for s, scenario in enumerate(scenarios):
                row = values.get((scenario, method))
                if row is not None:
                    xs.append(s + offset)
                    heights.append(100 * float(row[key]))
            bars = ax.bar(xs, heights, bar_width, color=_PALETTE[m], label=method, edgecolor="white", linewidth=0.5)
            ax.bar_label(
                bars,
                labels=[f"{h:.1f}" for h in heights],
                padding=2,
                fontsize=8,
                rotation=90 if vertical_labels else 0,
            )
        ax.set_title(panel_title, fontsize=12)
        ax.set_xticks(range(len(scenarios)), tick_labels, fontsize=10)
        # Fixed slots, so bar width means the same thing whatever the number of scenarios.
        ax.set_xlim(-0.5, len(scenarios) - 0.5)
        # Head-room above 100 so labels on full-height bars stay inside the axes.
        ax.set_ylim(0, _Y_TOP_VERTICAL_LABELS if vertical_labels else _Y_TOP_FLAT_LABELS)
        ax.set_yticks(range(0, 101, 20))
        ax.tick_params(axis="y", labelsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("Percent (%)", fontsize=10)
    figure.suptitle(title, fontsize=14)
    handles, labels = axes[0].get_legend_handles_labels()
    columns = min(len(methods), _MAX_LEGEND_COLUMNS)
    figure.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize=10, frameon=False)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # An explicit format stops matplotlib appending ".png" to a suffix-less path.
    figure.savefig(out, dpi=_DPI, format=out.suffix.lstrip(".") or "png")
    return out
