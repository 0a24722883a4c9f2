"""The head report behind ``sa-lens trace-heads``: tables, heatmaps and views in one folder.

Activation space always (``heads.csv``, ``heads_activation.{png,pdf}``, ``views.html``); with a harm vector also
weight space and the agreement of the two rankings (``weights_heads.csv``, ``o_alignment.csv``,
``heads_weights.{png,pdf}``); ``summary.json`` lists the top heads per measure and the rank correlations.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from transformer_lens.model_bridge import TransformerBridge

from sa_lens.analysis.figures import plot_head_heatmaps, save_figure
from sa_lens.analysis.heads import top_heads, trace_heads
from sa_lens.analysis.views import attention_view, projection_view, save_html
from sa_lens.analysis.weights import head_mass, o_alignment, rank_agreement
from sa_lens.harm_vector import HarmVector
from sa_lens.safety_vector import SafetyVector

__all__ = ["ACTIVATION_PANELS", "WEIGHT_PANELS", "head_weights_tidy", "write_head_report"]

ACTIVATION_PANELS = {
    "projection_diff": "Head output · direction\n(harmful − harmless)",
    "dla_diff": "Direct logit attribution\n(harmful − harmless)",
    "attrib_patch_into_harmless": "Attribution patching\nharmful → harmless",
    "attrib_patch_into_harmful": "Attribution patching\nharmless → harmful",
}
WEIGHT_PANELS = {
    "l2sq_total": "τH mass per head\n(q + o + (k + v)/group)",
    "l2sq_o": "τH mass in the head's\nW_O columns",
    "o_alignment": "ΔW_O alignment with\nthe direction (÷ random)",
}
# Activation rankings compared with weight rankings (by magnitude: a head matters whichever way it pushes).
AGREEMENT_MEASURES = ("dla_diff", "projection_diff", "attrib_patch_into_harmless", "attrib_patch_into_harmful")


def head_weights_tidy(mass: pd.DataFrame, alignment: pd.DataFrame) -> pd.DataFrame:
    """Weight-space head measures (:data:`WEIGHT_PANELS`) as tidy ``layer, head, measure, value, unit`` rows.

    Args:
        mass: :func:`sa_lens.analysis.weights.head_mass` output.
        alignment: :func:`sa_lens.analysis.weights.o_alignment` output.
    """
    frames = [
        mass[mass.matrix == "total"].assign(measure="l2sq_total", value=lambda d: d["l2sq"], unit="Σ τ² (weight units²)"),
        mass[mass.matrix == "o"].assign(measure="l2sq_o", value=lambda d: d["l2sq"], unit="Σ τ² (weight units²)"),
        alignment.assign(measure="o_alignment", value=lambda d: d["alignment"] / d["baseline"], unit="× random baseline"),
    ]
    return pd.concat([f[["layer", "head", "measure", "value", "unit"]] for f in frames], ignore_index=True)


def agreement_table(activation: pd.DataFrame, weights: pd.DataFrame) -> pd.DataFrame:
    """Spearman ρ between every weight measure and |activation measure| over heads (both tidy frames)."""
    act = activation[activation["head"].notna()].pivot_table(index=["layer", "head"], columns="measure", values="value")
    w = weights.pivot_table(index=["layer", "head"], columns="measure", values="value")
    rows = []
    for wm in w.columns:
        for am in (m for m in AGREEMENT_MEASURES if m in act.columns):
            rows.append({"weight_measure": wm, "activation_measure": f"|{am}|", **rank_agreement(w[wm], act[am].abs())})
    return pd.DataFrame(rows)


def write_head_report(
    model: TransformerBridge,
    direction: SafetyVector,
    harmful: Sequence[str],
    harmless: Sequence[str],
    out: str | Path,
    *,
    hv: HarmVector | None = None,
    patch: int | None = 12,
    top: int = 8,
    **tokens: Sequence[str | int],
) -> dict:
    """Trace heads, draw heatmaps, write views and (with ``hv``) the weight-space comparison into ``out``.

    Args:
        model: the bridge traced.
        direction: the safety/harm direction (``[n_layers, d_model]``).
        harmful, harmless: paired requests (see :func:`sa_lens.analysis.trace_heads`).
        out: report folder (created).
        hv: optional harm vector τH for the weight-space tables and the rank agreement.
        patch: heads patched exactly (top by attribution), or None.
        top: heads listed per measure and shown in the attention views.
        **tokens: ``refusal_tokens`` / ``compliance_tokens`` of :func:`sa_lens.analysis.trace_heads`.

    Returns:
        The summary written to ``summary.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = trace_heads(model, direction, harmful, harmless, patch=patch, **tokens)
    df.to_csv(out / "heads.csv", index=False)
    save_figure(plot_head_heatmaps(df, list(ACTIVATION_PANELS), ACTIVATION_PANELS,
                                   "Where the direction lives: activation space (logits; projection in residual units)"),
                out / "heads_activation")
    measures = [m for m in (*ACTIVATION_PANELS, "patch_into_harmless", "patch_into_harmful") if m in set(df["measure"])]
    tops = {m: top_heads(df, m, top, by_abs=True) for m in measures}
    views = {f"Top heads by |DLA diff| on a harmful request: {harmful[0]!r}": attention_view(model, harmful[0], tops["dla_diff"]),
             f"… on a harmless request: {harmless[0]!r}": attention_view(model, harmless[0], tops["dla_diff"]),
             "Residual projection on the direction, harmful request": projection_view(model, harmful[0], direction),
             "Residual projection on the direction, harmless request": projection_view(model, harmless[0], direction)}
    save_html(views, out / "views.html", title="sa_lens head report")
    summary: dict = {"attrs": df.attrs, "top_heads": {m: [f"L{l}H{h}" for l, h in hs] for m, hs in tops.items()}}
    if hv is not None:
        mass = head_mass(hv, model.cfg.n_heads, getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
        alignment = o_alignment(hv, direction.directions, model.cfg.n_heads)
        mass.to_csv(out / "weights_heads.csv", index=False)
        alignment.to_csv(out / "o_alignment.csv", index=False)
        weights = head_weights_tidy(mass, alignment)
        save_figure(plot_head_heatmaps(weights, list(WEIGHT_PANELS), WEIGHT_PANELS, "Weight space: τH per head"),
                    out / "heads_weights")
        agreement = agreement_table(df, weights)
        agreement.to_csv(out / "agreement.csv", index=False)
        summary["agreement"] = agreement.to_dict("records")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
