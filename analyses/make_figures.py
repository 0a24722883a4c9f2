"""Regenerate every figure from a results folder, one command: ``python analyses/make_figures.py [results] [--lab PATH]``.

Reads what exists under ``results`` (default ``analyses/results``) and writes PNG + PDF into ``results/figures``:

- ``methods``: ASR / over-refusal / utility by method and scenario (paper Tables 1–2 as bars), from a lab
  ``results.json`` (``--lab``, default ``results/lab_results.json``; written by ``sa-lens lab``);
- ``sweep_SFT``, ``sweep_BASE``: λ × top-k, task-vector λ and α sweeps with the Pareto view, from ``sweep_dev.json``;
- ``heads_activation``, ``heads_weights``: layer × head heatmaps, from ``heads/`` (``analyses/trace_lab.py``);
- ``head_ablation``: logit difference and ASR with the top heads ablated, from ``heads/ablation.csv``;
- ``layerwise``: per-layer curves, from ``layerwise/layerwise.csv`` (``analyses/layerwise.py``);
- ``transfer``: ASR per harm source vs over-refusal, one point per setting, the chosen one marked (dev sources),
  and the four reported states with intervals (held-out sources), from ``transfer/transfer.json``
  (``analyses/transfer.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from sa_lens.analysis.figures import (
    pareto_front,
    plot_head_heatmaps,
    plot_layer_curves,
    plot_method_comparison,
    plot_sweep,
    save_figure,
)
from sa_lens.analysis.report import ACTIVATION_PANELS, WEIGHT_PANELS, head_weights_tidy


def _ablation_figure(df: pd.DataFrame) -> Figure:
    """Left: mean refusal − compliance logit difference with heads ablated; right: judged ASR (both 95 % intervals)."""
    names = list(dict.fromkeys(df["ablated"]))
    figure = Figure(figsize=(12, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    width = 0.38
    for i, (metric, label, colour) in enumerate((("logit_diff_harmful", "harmful requests", "tab:red"),
                                                 ("logit_diff_safe", "safe requests", "tab:blue"))):
        rows = df[df.metric == metric].set_index("ablated").loc[names]
        x = [j + (i - 0.5) * width for j in range(len(names))]
        err = [rows["value"] - rows["ci_low"], rows["ci_high"] - rows["value"]]
        left.bar(x, rows["value"], width, yerr=err, capsize=3, color=colour, label=label)
    left.axhline(0, color="black", linewidth=0.8)
    left.set_ylabel("Refusal − compliance logit difference (logits)")
    left.set_title("Mean logit difference at the reply's first token (all dev requests)", fontsize=10)
    # Room below the longest error bar for the legend, so it covers no bar.
    left.set_ylim(min(-3.9, float(df[df.metric.str.startswith("logit_diff")]["ci_low"].min()) - 0.8), 0.1)
    left.legend(fontsize=9, loc="lower center", ncols=2)
    asr = df[df.metric == "asr"].set_index("ablated").loc[names]
    bars = right.bar(range(len(names)), 100 * asr["value"], 0.6, color="tab:red",
                     yerr=[100 * (asr["value"] - asr["ci_low"]), 100 * (asr["ci_high"] - asr["value"])], capsize=3)
    right.bar_label(bars, labels=[f"{100 * v:.0f}" for v in asr["value"]], padding=10, fontsize=8)
    right.set_ylim(0, 100)
    right.set_ylabel("ASR (%) ↓")
    right.set_title(f"Keyword-judged ASR, greedy replies (n = {int(asr['n'].iloc[0])} dev harmful requests)", fontsize=10)
    for ax in (left, right):
        ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names], rotation=20, ha="right", fontsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    figure.suptitle("Zero-ablating 10 heads of θb: top heads by each measure vs 10 random heads", fontsize=12)
    return figure


def _transfer_figure(res: dict) -> Figure:
    """Top: each dev source's ASR vs dev over-refusal for every setting tried (Pareto front on macro ASR joined,
    chosen starred); bottom: each held-out source, Original / chosen / paper / lab defaults with 95 % intervals."""
    dev = {k: v for k, v in res["dev_hdr"].items()} | {k: v for k, v in res["dev_sa"].items() if k != "Original"}
    dev_sources = [s for s, m in res["sources"].items() if m["role"] == "dev" and f"asr_{s}" in dev["Original"]]
    held_sources = [s for s in res["sources"] if f"asr_{s}" in res["held_out"]["Original"]]
    figure = Figure(figsize=(4.2 * max(len(dev_sources), len(held_sources)), 8), layout="constrained")
    axes = figure.subplots(2, max(len(dev_sources), len(held_sources)), squeeze=False)
    names = list(dev)
    front = set(pareto_front([{"asr": dev[n]["asr_macro"], "over_refusal": dev[n]["over_refusal"],
                               "utility": dev[n]["utility"]} for n in names]))
    chosen = res["sa_choice"] or res["hdr_choice"]
    for ax, source in zip(axes[0], dev_sources):
        for i, name in enumerate(names):
            r = dev[name]
            style = ({"marker": "X", "color": "black", "s": 70} if name == "Original"
                     else {"marker": "*", "color": "tab:red", "s": 180} if name == chosen
                     else {"marker": "D", "color": "tab:purple", "s": 40} if name == "Paper defaults"
                     else {"marker": "o", "color": "tab:blue" if name.startswith("HDR") else "tab:green",
                           "s": 30 if i in front else 14, "alpha": 1.0 if i in front else 0.5})
            ax.scatter(100 * r["over_refusal"], 100 * r[f"asr_{source}"], zorder=3, **style)
        limit = 100 * (dev["Original"]["over_refusal"] + res["rule"]["max_over_refusal_rise"])
        ax.axvline(limit, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"dev: {source} (n = {dev['Original'][f'asr_{source}_n']})", fontsize=10)
        ax.set_xlabel("over-refusal, XSTest dev (%) ↓")
        ax.set_ylabel("ASR (%) ↓")
    for ax, source in zip(axes[1], held_sources):
        for i, (name, r) in enumerate(res["held_out"].items()):
            low, high = r[f"asr_{source}_ci95"]
            ax.errorbar(100 * r["over_refusal"], 100 * r[f"asr_{source}"], fmt="o", capsize=3,
                        yerr=[[100 * (r[f"asr_{source}"] - low)], [100 * (high - r[f"asr_{source}"])]],
                        color=("black", "tab:red", "tab:purple", "tab:orange")[i % 4], label=name)
        same = res["sources"][source].get("same_source_as")
        ax.set_title(f"held out: {source} (n = {res['held_out']['Original'][f'asr_{source}_n']})"
                     + (f"\nsame source as {same}" if same else ""), fontsize=10)
        ax.set_xlabel("over-refusal, XSTest held out (%) ↓")
        ax.set_ylabel("ASR (%) ↓")
    axes[1][0].legend(fontsize=8)
    for ax in axes.flat:
        ax.spines[["top", "right"]].set_visible(False)
        if not ax.has_data():
            ax.set_visible(False)
    figure.suptitle("Does the gain transfer? Top: every setting tried on the dev sources (★ chosen, ✕ Original, ◆ paper "
                    "defaults; blue HDR alone, green Safety Arithmetic;\nlarge dots: Pareto front on macro ASR, "
                    "over-refusal and utility; dashed: the rule's over-refusal limit). Bottom: sources not used to "
                    "choose, 95 % intervals.", fontsize=10)
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
        weights = head_weights_tidy(pd.read_csv(heads / "weights_heads.csv"), pd.read_csv(heads / "o_alignment.csv"))
        written += save_figure(plot_head_heatmaps(weights, list(WEIGHT_PANELS), WEIGHT_PANELS,
                                                  "Weight space, τH = θH − θb per head"), out / "heads_weights")
    if (heads / "ablation.csv").exists():
        written += save_figure(_ablation_figure(pd.read_csv(heads / "ablation.csv")), out / "head_ablation")
    if (root / "layerwise" / "layerwise.csv").exists():
        df = pd.read_csv(root / "layerwise" / "layerwise.csv")
        df["layer"] = df["layer"].astype("Int64")
        run = json.loads((root / "layerwise" / "run.json").read_text())
        labels = {"directional_ablation": "Directional ablation (aligned θb)",
                  "safe_align": f"Safe-Align α = {run['alpha']:g} (SFT)",
                  "harm_removal": f"HDR λ = {run['lam']:g}, top-{run['top_k']:.0%} (SFT)"}
        n = ", ".join(f"{k} n={v}" for k, v in run["n"].items())
        written += save_figure(plot_layer_curves(df, f"One layer at a time (dev subsample: {n}; keyword judge)", labels),
                               out / "layerwise")
    if (root / "transfer" / "transfer.json").exists():
        written += save_figure(_transfer_figure(json.loads((root / "transfer" / "transfer.json").read_text())),
                               out / "transfer")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
