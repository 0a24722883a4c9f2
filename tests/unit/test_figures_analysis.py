"""Sweep, head-heatmap and per-layer figures: drawn from tidy frames, saved as PNG and PDF."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from sa_lens.analysis.figures import pareto_front, plot_head_heatmaps, plot_layer_curves, plot_sweep, save_figure  # noqa: E402

SWEEP = Path(__file__).parents[2] / "analyses" / "results" / "sweep_dev.json"


def test_pareto_front_keeps_only_non_dominated_points():
    pts = [{"asr": 0.1, "over_refusal": 0.5, "utility": 0.5},
           {"asr": 0.5, "over_refusal": 0.1, "utility": 0.5},
           {"asr": 0.6, "over_refusal": 0.6, "utility": 0.4},   # dominated by both
           {"asr": 0.6, "over_refusal": 0.6, "utility": 0.9}]   # best utility: kept
    assert pareto_front(pts) == [0, 1, 3]


def test_sweep_figure_from_the_committed_sweep(tmp_path):
    rows = json.loads(SWEEP.read_text())
    figure = plot_sweep(rows, "SFT")
    paths = save_figure(figure, tmp_path / "sweep")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 10_000 for p in paths)
    assert len(figure.axes) == 5  # four panels and the utility colour bar
    assert plt.get_fignums() == []
    with pytest.raises(ValueError, match="No Original row"):
        plot_sweep([r for r in rows if r["method"] != "Original"], "SFT")


def test_head_heatmap_has_one_panel_per_measure_and_names_missing_ones():
    df = pd.DataFrame([{"layer": l, "head": h, "measure": m, "value": (l - h) * (1 if m == "a" else 0.1), "unit": "logits"}
                       for l in range(3) for h in range(2) for m in ("a", "b")])
    figure = plot_head_heatmaps(df, ["a", "b"], {"a": "A"})
    image = figure.axes[0].images[0].get_array()
    assert image.shape == (3, 2) and image[2, 0] == 2.0  # rows are layers, columns heads
    assert figure.axes[0].get_title() == "A"
    with pytest.raises(ValueError, match="'c'"):
        plot_head_heatmaps(df, ["c"])


def test_layer_curves_draw_each_method_against_its_baseline():
    rows = []
    for method in ("directional_ablation", "harm_removal"):
        rows.append({"method": method, "layer": pd.NA, "metric": "asr", "value": 0.5, "ci_low": 0.4, "ci_high": 0.6})
        rows += [{"method": method, "layer": l, "metric": "asr", "value": 0.1 * l, "ci_low": 0.0, "ci_high": 0.2 * l}
                 for l in range(4)]
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    figure = plot_layer_curves(df)
    ax = figure.axes[0]
    assert [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")] == \
        ["directional_ablation", "harm_removal"]
    assert len(ax.get_lines()) == 4  # two curves, two dashed baselines
    with pytest.raises(ValueError, match="needs rows"):
        plot_layer_curves(df.assign(metric="other"))
