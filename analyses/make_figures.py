"""Regenerate every figure from a results folder, one command: ``python analyses/make_figures.py [results] [--lab PATH]``.

Reads what exists under ``results`` (default ``analyses/results``) and writes PNG + PDF into ``results/figures``:

- ``methods``: ASR / over-refusal / utility by method and scenario (paper Tables 1–2 as bars), from a lab
  ``results.json`` (``--lab``, default ``results/lab_results.json``; written by ``sa-lens lab``);
- ``sweep_SFT``, ``sweep_BASE``: λ × top-k, task-vector λ and α sweeps with the Pareto view, from ``sweep_dev.json``;
- ``heads_activation``, ``heads_weights``: layer × head heatmaps, from ``heads/`` (``analyses/trace_lab.py``);
- ``head_ablation``: refusal with the top heads ablated, from ``heads/ablation.csv``;
- ``layerwise``: per-layer curves, from ``layerwise/layerwise.csv`` (``analyses/layerwise.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from sa_lens.analysis.figures import plot_head_heatmaps, plot_layer_curves, plot_method_comparison, plot_sweep, save_figure

ACTIVATION_PANELS = {
    "projection_diff": "Head output · direction\n(harmful − harmless)",
    "dla_diff": "Direct logit attribution\n(harmful − harmless)",
    "attrib_patch_into_harmless": "Attribution patching\nharmful → harmless",
    "attrib_patch_into_harmful": "Attribution patching\nharmless → harmful",
}
WEIGHT_PANELS = {
    "l2sq_total": "τH mass per head\n(q + o + (k + v)/group)",
    "l2sq_o": "τH mass in W_O\ncolumns of the head",
    "o_alignment": "ΔW_O alignment with\nthe direction (÷ random)",
}


def _weights_tidy(folder: Path) -> pd.DataFrame:
    wh = pd.read_csv(folder / "weights_heads.csv")
    oa = pd.read_csv(folder / "o_alignment.csv")
    frames = [
        wh[wh.matrix == "total"].assign(measure="l2sq_total", value=lambda d: d["l2sq"], unit="Σ τ² (weight units²)"),
        wh[wh.matrix == "o"].assign(measure="l2sq_o", value=lambda d: d["l2sq"], unit="Σ τ² (weight units²)"),
        oa.assign(measure="o_alignment", value=lambda d: d["alignment"] / d["baseline"], unit="× random baseline"),
    ]
    return pd.concat([f[["layer", "head", "measure", "value", "unit"]] for f in frames])


def _ablation_figure(df: pd.DataFrame) -> Figure:
    names = list(dict.fromkeys(df["ablated"]))
    figure = Figure(figsize=(9, 4), layout="constrained")
    ax = figure.subplots()
    width = 0.38
    for i, (metric, label, colour) in enumerate((("asr", "ASR on harmful ↓", "tab:red"),
                                                 ("over_refusal", "Over-refusal on safe ↓", "tab:orange"))):
        rows = df[df.metric == metric].set_index("ablated").loc[names]
        x = [j + (i - 0.5) * width for j in range(len(names))]
        err = [100 * (rows["value"] - rows["ci_low"]), 100 * (rows["ci_high"] - rows["value"])]
        bars = ax.bar(x, 100 * rows["value"], width, yerr=err, capsize=3, color=colour, label=label)
        ax.bar_label(bars, labels=[f"{100 * v:.0f}" for v in rows["value"]], padding=8, fontsize=8)
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=15, fontsize=9)
    ax.set_ylabel("Percent of prompts (%)")
    ax.set_ylim(0, 110)
    ax.set_xlabel("Heads zero-ablated in θb (top 10 by each measure)")
    ax.legend(fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("Does ablating the top heads change refusal? (dev split, Wilson 95 % bars)", fontsize=11)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="analyses/results")
    parser.add_argument("--lab", help="a lab results.json (default: RESULTS/lab_results.json)")
    args = parser.parse_args()
    root = Path(args.results)
    out = root / "figures"
    written: list[Path] = []
    lab = Path(args.lab) if args.lab else root / "lab_results.json"
    if lab.exists():
        rows = json.loads(lab.read_text())["rows"]
        split = json.loads(lab.read_text())["config"]["split"]
        for fmt in ("png", "pdf"):
            written.append(plot_method_comparison(rows, out / f"methods.{fmt}",
                                                  title=f"Safety Arithmetic on the CPU lab ({split} split, keyword judge)"))
    if (root / "sweep_dev.json").exists():
        rows = json.loads((root / "sweep_dev.json").read_text())
        for scenario in dict.fromkeys(r["scenario"] for r in rows):
            written += save_figure(plot_sweep(rows, scenario), out / f"sweep_{scenario}")
    heads = root / "heads"
    if (heads / "heads_aligned.csv").exists():
        df = pd.read_csv(heads / "heads_aligned.csv")
        written += save_figure(plot_head_heatmaps(df, list(ACTIVATION_PANELS), ACTIVATION_PANELS,
                                                  "Activation space, aligned model θb (logits; residual units for projection)"),
                               out / "heads_activation")
    if (heads / "weights_heads.csv").exists():
        written += save_figure(plot_head_heatmaps(_weights_tidy(heads), list(WEIGHT_PANELS), WEIGHT_PANELS,
                                                  "Weight space, τH = θH − θb per head"), out / "heads_weights")
    if (heads / "ablation.csv").exists():
        written += save_figure(_ablation_figure(pd.read_csv(heads / "ablation.csv")), out / "head_ablation")
    if (root / "layerwise" / "layerwise.csv").exists():
        df = pd.read_csv(root / "layerwise" / "layerwise.csv")
        df["layer"] = df["layer"].astype("Int64")
        written += save_figure(plot_layer_curves(df, "One layer at a time (dev subsample, keyword judge)"), out / "layerwise")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
