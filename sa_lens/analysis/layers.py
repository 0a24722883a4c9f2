"""Layer-wise interventions: one layer at a time, measured by generation (ASR, over-refusal, utility).

Three interventions (:mod:`sa_lens.interventions`), each confined to a single layer l:

- ``directional_ablation``: remove the direction (row l of the safety vector) from the residual stream at
  ``blocks.{l}.hook_{site}`` at every position (Arditi et al. 2024 ablate it at every layer; one layer at a
  time shows where it is causally read);
- ``safe_align``: the Safe-Align injection (paper §3.2, official formula) at layer l's MLP output only;
- ``harm_removal``: HDR, θ − λ·τH′ restricted to the parameters of layer l (paper §3.1).

The sweep runs them through :func:`sa_lens.evaluate` (resumable with ``out_dir``) and returns a tidy DataFrame
(``method, layer, set, metric, value, n, ci_low, ci_high``) with a ``layer = NA`` baseline row per metric, so a
per-layer curve is read against the unedited model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import pandas as pd

from sa_lens.defaults import DEFAULT_ALPHA, DEFAULT_LAM
from sa_lens.errors import InputError
from sa_lens.evaluation.decoding import GenerationSettings
from sa_lens.evaluation.harness import DataSpec, evaluate
from sa_lens.harm_vector import HarmVector
from sa_lens.interventions import Compose, DirectionalAblation, HarmRemoval, Intervention, SafeAlign
from sa_lens.model_state import in_analysis_state
from sa_lens.safety_vector import SafetyVector

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["METHODS", "layer_intervention", "layer_sweep"]

METHODS = ("directional_ablation", "safe_align", "harm_removal")
# Report metric → the sweep's name for it (exact match on the bundled QA set is the lab's "utility").
_METRICS = {"harmful": ("asr", "degenerate"), "safe": ("over_refusal",), "qa": ("exact_match",)}


def _check(method: str, sv: SafetyVector | None, hv: HarmVector | None) -> None:
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}; got {method!r}.")
    if method == "harm_removal" and hv is None:
        raise InputError("harm_removal needs hv=HarmVector.")
    if method != "harm_removal" and sv is None:
        raise InputError(f"{method} needs sv=SafetyVector.")


def layer_intervention(
    method: str,
    layer: int,
    *,
    sv: SafetyVector | None = None,
    hv: HarmVector | None = None,
    alpha: float = DEFAULT_ALPHA,
    lam: float = DEFAULT_LAM,
    site: str = "resid_post",
    allow_other_model: bool = False,
) -> Intervention:
    """One intervention confined to one layer; ``with layer_intervention(...).apply(model):`` puts it on.

    Args:
        method: ``directional_ablation``, ``safe_align`` or ``harm_removal``.
        layer: the layer index.
        sv: the safety/harm direction ``[n_layers, d_model]`` (ablation and Safe-Align).
        hv: the harm vector (HDR).
        alpha: Safe-Align α.
        lam: HDR λ.
        site: where directional ablation removes the direction (``resid_post`` by default, where the
            vector was read; ``resid_pre``, ``attn_out``, ``mlp_out`` also accepted).
        allow_other_model: apply ``sv`` to a model other than the one it was read from.

    Raises:
        ValueError: an unknown method, the vector the method needs is missing, or a bad layer / site.
    """
    _check(method, sv, hv)
    if method == "harm_removal":
        return HarmRemoval(hv, lam, layers=(layer,))
    if method == "directional_ablation":
        return DirectionalAblation(sv, layers=(layer,), sites=(site,), allow_other_model=allow_other_model)
    return SafeAlign(vector=sv, alpha=alpha, layers=(layer,), allow_other_model=allow_other_model)


@in_analysis_state
def layer_sweep(
    model: TransformerBridge,
    sets: Sequence[DataSpec],
    method: str,
    layers: Sequence[int] | None = None,
    *,
    baseline: bool = True,
    settings: GenerationSettings | str = "greedy",
    max_new_tokens: Mapping[str, int] | None = None,
    batch_size: int = 32,
    out_dir: str | None = None,
    progress: bool = True,
    **options,
) -> pd.DataFrame:
    """Measure ``method`` at each layer in turn with :func:`sa_lens.evaluate` (keyword judge).

    Args:
        model: the bridge.
        sets: data sets as :func:`sa_lens.evaluate` takes them (``harmful`` → ``asr`` and ``degenerate``,
            ``safe`` → ``over_refusal``, QA → ``utility`` (exact match), multiple choice → ``accuracy``); with two
            or more harmful sets, also ``asr`` of :data:`~sa_lens.evaluation.report.SOURCES_MACRO` (their mean).
        method: ``directional_ablation``, ``safe_align`` or ``harm_removal``.
        layers: layers to try (all by default).
        baseline: also measure the model without intervention (rows with ``layer`` NA).
        settings, max_new_tokens: decoding preset and per-set budgets, as in :func:`sa_lens.evaluate`.
        batch_size: prompts per generation batch.
        out_dir: report folder; a rerun resumes (each layer's state is keyed by its intervention's fingerprint).
        progress: show a progress bar.
        **options: ``sv``, ``hv``, ``alpha``, ``lam``, ``site``, ``allow_other_model`` of :func:`layer_intervention`.

    Returns:
        Tidy rows ``method, layer, set, metric, value, n, ci_low, ci_high``; values are fractions in [0, 1] with
        bootstrap 95 % intervals. Cost: (len(layers) + baseline) generation passes over every set.

    Raises:
        ValueError: as :func:`layer_intervention` (checked before any generation), as :func:`sa_lens.evaluate`, or
            hooks left on the model (:mod:`sa_lens.model_state`; the sweep runs in eval mode, the caller's mode
            restored).
    """
    _check(method, options.get("sv"), options.get("hv"))
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    states: dict[str, Intervention] = {"baseline": Compose()} if baseline else {}
    states |= {f"L{layer}": layer_intervention(method, layer, **options) for layer in layers}
    report = evaluate(model, sets, "keyword", states=states, settings=settings, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, out_dir=out_dir, progress=progress)
    rows = []
    for r in report.rows:
        layer = pd.NA if r["state"] == "baseline" else int(r["state"][1:])
        # A row may lack a metric: the macro over harm sources has no degenerate share, an all-degenerate set no ASR.
        for metric in (m for m in _METRICS.get(r["kind"], (r["headline"],)) if m is not None and m in r):
            low, high = r[f"{metric}_ci95"]
            rows.append({"method": method, "layer": layer, "set": r["dataset"],
                         "metric": "utility" if metric == "exact_match" else metric,
                         "value": r[metric], "n": r[f"{metric}_n"], "ci_low": low, "ci_high": high})
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    return df
