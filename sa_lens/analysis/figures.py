"""Publication figures: methods across scenarios, λ × top-k and α sweeps, head heatmaps, per-layer curves.

Draws on a bare ``matplotlib.figure.Figure`` rather than through ``pyplot``, so it works
under any backend (including ``Agg`` on headless machines), never opens a window, and
leaves no figure registered with pyplot after saving. The newer functions return the
``Figure`` (a notebook displays it) and :func:`save_figure` writes it as PNG and PDF.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from sa_lens.errors import InputError
from sa_lens.validation import is_finite_real

__all__ = ["pareto_front", "plot_head_heatmaps", "plot_layer_curves", "plot_method_comparison", "plot_sweep",
           "save_figure"]

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
                raise InputError(f"row {index} lacks the key {key!r}; every row needs {required}")
        for key in metric_keys:
            value = row[key]
            if not is_finite_real(value) or not 0.0 <= value <= 1.0:
                raise InputError(
                    f"row {index} has {key}={value!r}; metrics must be fractions in [0, 1], not percent"
                )
        pair = (str(row["scenario"]), str(row["method"]))
        if pair in seen:
            raise InputError(f"two rows for scenario {pair[0]!r} and method {pair[1]!r}; keep one per pair")
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
        raise InputError("plot_method_comparison() got no rows; pass one mapping per (scenario, method)")
    metrics = [*_METRICS, _DEGENERATE] if all(_DEGENERATE[0] in row for row in rows) else list(_METRICS)
    _check_rows(rows, [key for key, _ in metrics])

    scenarios = _first_seen(rows, "scenario")
    methods = _first_seen(rows, "method")
    if len(methods) > len(_PALETTE):
        raise InputError(f"{len(methods)} methods exceed the {len(_PALETTE)} distinguishable colours; split the figure")
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


def save_figure(figure: Figure, stem: str | Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``figure`` as ``stem.png`` (200 dpi) and ``stem.pdf`` (vector); parents are created.

    Returns:
        The paths written, in ``formats`` order.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        figure.savefig(path, dpi=_DPI, format=fmt)
        paths.append(path)
    return paths


def _percent_axis(ax, label: str | None = None) -> None:
    ax.set_ylim(-3, 103)
    ax.set_yticks(range(0, 101, 20))
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    if label:
        ax.set_ylabel(label)


# (row key, legend label, colour, marker) of the three outcomes every sweep panel shows.
_OUTCOMES = (
    ("asr", "ASR ↓", _PALETTE[3], "o"),
    ("over_refusal", "Over-refusal ↓", _PALETTE[1], "s"),
    ("utility", "Utility ↑", _PALETTE[2], "^"),
)


def pareto_front(points: Sequence[Mapping], minimise: Sequence[str] = ("asr", "over_refusal"),
                 maximise: Sequence[str] = ("utility",)) -> list[int]:
    """Indices of the points no other point beats on every objective (weakly) and strictly on one."""
    keys = [(m, 1) for m in minimise] + [(m, -1) for m in maximise]
    vals = [[sign * float(p[m]) for m, sign in keys] for p in points]
    front = []
    for i, a in enumerate(vals):
        dominated = any(all(b_ <= a_ for a_, b_ in zip(a, b)) and any(b_ < a_ for a_, b_ in zip(a, b))
                        for j, b in enumerate(vals) if j != i)
        if not dominated:
            front.append(i)
    return front


def plot_sweep(rows: Sequence[Mapping], scenario: str = "SFT", title: str | None = None) -> Figure:
    """λ × top-k, task-vector λ and Safe-Align α sweeps, plus the ASR / over-refusal / utility Pareto front.

    Args:
        rows: sweep rows as written by ``analyses/sweep_dev.py`` (``scenario``, ``method``, ``setting`` with
            ``lam``/``top_k``/``tv_lam``/``alpha``, and ``asr``, ``over_refusal``, ``utility`` as fractions).
        scenario: which scenario's rows to draw.
        title: figure title (default names the scenario).

    Returns:
        A four-panel figure: HDR (TIES) λ at top-k 10 % with the other top-k values as open markers, HDR task
        vector λ, Safe-Align α (log x), and ASR vs over-refusal with utility as colour, Pareto points ringed.

    Raises:
        ValueError: no rows for ``scenario`` or no ``Original`` row.
    """
    rows = [r for r in rows if r["scenario"] == scenario]
    original = next((r for r in rows if r["method"] == "Original"), None)
    if original is None:
        raise InputError(f"No Original row for scenario {scenario!r}; the sweep needs its reference point.")
    figure = Figure(figsize=(17, 4.4), layout="constrained")
    axes = figure.subplots(1, 4)
    panels = (("HDR (TIES top-k)", "lam", "λ (top-k = 10 %)"), ("HDR (task vector)", "tv_lam", "λ (untrimmed τH)"),
              ("Safe-Align", "alpha", "α"))
    for ax, (method, knob, xlabel) in zip(axes, panels):
        pts = [r for r in rows if r["method"] == method and knob in r["setting"]]
        main = sorted((r for r in pts if r["setting"].get("top_k", 0.10) == 0.10), key=lambda r: r["setting"][knob])
        xs = [r["setting"][knob] for r in main]
        for key, label, colour, marker in _OUTCOMES:
            ax.plot(xs, [100 * r[key] for r in main], marker=marker, color=colour, label=label)
            ax.axhline(100 * original[key], color=colour, linestyle=":", linewidth=1)
            for r in pts:
                if r not in main:  # other top-k values at one λ: open markers, labelled
                    ax.plot(r["setting"][knob], 100 * r[key], marker=marker, color=colour, markerfacecolor="white")
                    if key == "asr":
                        ax.annotate(f"top-k {r['setting']['top_k']:.0%}", (r["setting"][knob], 100 * r[key]),
                                    textcoords="offset points", xytext=(6, -3), fontsize=8)
        if knob == "alpha":
            ax.set_xscale("log")
            ax.minorticks_off()  # log minor ticks would print 2×10⁻¹ … between the swept values
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_title(method, fontsize=12)
        ax.set_xlabel(xlabel)
        _percent_axis(ax, "Rate (%)" if ax is axes[0] else None)
    axes[0].legend(loc="upper right", fontsize=8, title="dotted: Original", title_fontsize=8)

    ax = axes[3]
    pts = [r for r in rows if r["method"] != "Original"] + [original]
    front = set(pareto_front(pts))
    scatter = ax.scatter([100 * r["asr"] for r in pts], [100 * r["over_refusal"] for r in pts],
                         c=[100 * r["utility"] for r in pts], cmap="viridis", s=60,
                         edgecolors=["black" if i in front else "none" for i in range(len(pts))], linewidths=1.5)
    ax.scatter([100 * original["asr"]], [100 * original["over_refusal"]], marker="*", s=220, color="none",
               edgecolors="crimson", linewidths=1.5, label="Original")
    ax.scatter([], [], s=60, color="none", edgecolors="black", label="Pareto-optimal")
    figure.colorbar(scatter, ax=ax, label="Utility (QA exact match, %)")
    ax.set_xlabel("ASR (%) ↓")
    ax.set_ylabel("Over-refusal (%) ↓")
    ax.set_title("All settings: trade-off", fontsize=12)
    ax.set_xlim(-3, 103)
    _percent_axis(ax)
    ax.legend(loc="upper right", fontsize=8)
    figure.suptitle(title or f"Dev-split sweeps, {scenario} scenario (keyword judge, greedy)", fontsize=14)
    return figure


def plot_head_heatmaps(df: pd.DataFrame, measures: Sequence[str], titles: Mapping[str, str] | None = None,
                       suptitle: str | None = None) -> Figure:
    """Layer × head heatmaps, one panel per measure, diverging colours centred on zero (or sequential if ≥ 0).

    Args:
        df: tidy rows with ``layer``, ``head``, ``measure``, ``value`` and optionally ``unit`` (a
            :func:`sa_lens.analysis.trace_heads` frame, or weight measures in the same shape).
        measures: measures to draw, left to right.
        titles: panel title per measure (default: the measure name).
        suptitle: figure title.

    Raises:
        ValueError: a measure with no head rows.
    """
    titles = dict(titles or {})
    n_layers = int(df["layer"].max()) + 1
    figure = Figure(figsize=(3.6 * len(measures) + 0.6, 0.2 * n_layers + 1.8), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(measures), sharey=True))
    for ax, measure in zip(axes, measures):
        rows = df[(df["measure"] == measure) & df["head"].notna()]
        if rows.empty:
            raise InputError(f"No head rows for measure {measure!r}.")
        grid = rows.pivot_table(index="layer", columns="head", values="value").reindex(range(n_layers))
        values = grid.to_numpy(float)
        finite = values[np.isfinite(values)]
        if finite.min() >= 0:
            image = ax.imshow(values, aspect="auto", cmap="viridis", origin="lower", interpolation="nearest")
        else:
            bound = float(np.abs(finite).max()) or 1.0
            image = ax.imshow(values, aspect="auto", cmap="RdBu_r", origin="lower", interpolation="nearest",
                              norm=TwoSlopeNorm(0.0, -bound, bound))
        unit = rows["unit"].iloc[0] if "unit" in rows else ""
        figure.colorbar(image, ax=ax, label=unit, shrink=0.9)
        ax.set_title(titles.get(measure, measure), fontsize=10)
        ax.set_xlabel("Head")
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(0, n_layers, max(1, n_layers // 10)))
    axes[0].set_ylabel("Layer")
    if suptitle:
        figure.suptitle(suptitle, fontsize=12)
    return figure


_LAYER_METRICS = (("asr", "ASR on harmful prompts ↓"), ("over_refusal", "Over-refusal on safe prompts ↓"),
                  ("utility", "Utility (QA exact match) ↑"))


def plot_layer_curves(df: pd.DataFrame, title: str | None = None,
                      labels: Mapping[str, str] | None = None) -> Figure:
    """Per-layer curves of a :func:`sa_lens.analysis.layers.layer_sweep` frame (several methods concatenated).

    One panel per metric present among ASR, over-refusal and utility; x = the layer intervened on, one line
    per method with its 95 % band (the report's bootstrap interval), the method's no-intervention baseline as
    a dashed line.

    Raises:
        ValueError: none of the three metrics is in ``df``.
    """
    labels = dict(labels or {})
    metrics = [(m, t) for m, t in _LAYER_METRICS if m in set(df["metric"])]
    if not metrics:
        raise InputError("plot_layer_curves needs rows with metric asr, over_refusal or utility.")
    figure = Figure(figsize=(5.2 * len(metrics), 4.2), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(metrics), sharey=True))
    methods = list(dict.fromkeys(df["method"]))
    for ax, (metric, panel_title) in zip(axes, metrics):
        for i, method in enumerate(methods):
            rows = df[(df["method"] == method) & (df["metric"] == metric)]
            curve = rows[rows["layer"].notna()].sort_values("layer")
            if curve.empty:
                continue
            colour = _PALETTE[i % len(_PALETTE)]
            x = curve["layer"].astype(int)
            ax.plot(x, 100 * curve["value"], marker="o", markersize=3, color=colour, label=labels.get(method, method))
            ax.fill_between(x, 100 * curve["ci_low"], 100 * curve["ci_high"], color=colour, alpha=0.15, linewidth=0)
            base = rows[rows["layer"].isna()]
            if not base.empty:
                ax.axhline(100 * base["value"].iloc[0], color=colour, linestyle="--", linewidth=1)
        ax.set_title(panel_title, fontsize=11)
        ax.set_xlabel("Layer intervened on")
        _percent_axis(ax, "Percent of prompts (%)" if ax is axes[0] else None)
    # Below the panels: inside, the legend would cover curves that span the whole height.
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside lower center", ncols=len(names), fontsize=9,
                  title="dashed: no intervention", title_fontsize=8, frameon=False)
    if title:
        figure.suptitle(title, fontsize=13)
    return figure
