"""Layer-wise interventions: one layer at a time, measured by generation (ASR, over-refusal, utility).

Three interventions, each confined to a single layer l:

- ``directional_ablation``: remove the direction (row l of the safety vector) from the residual stream at
  ``blocks.{l}.hook_{site}`` at every position (Arditi et al. 2024 ablate it at every layer; one layer at a
  time shows where it is causally read);
- ``safe_align``: the Safe-Align injection (paper §3.2, official formula) at layer l's MLP output only;
- ``harm_removal``: HDR, θ − λ·τH′ restricted to the parameters of layer l (paper §3.1).

The sweep returns a tidy DataFrame (``method, layer, metric, value, n, ci_low, ci_high``) with a
``layer = NA`` baseline row per metric, so a per-layer curve is read against the unedited model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import pandas as pd
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from sa_lens.defaults import DEFAULT_ALPHA, DEFAULT_LAM
from sa_lens.errors import InputError
from sa_lens.evaluation.runner import EvalSet, evaluate_state
from sa_lens.harm_removal import harm_removal
from sa_lens.harm_vector import HarmVector
from sa_lens.safety_vector import SafetyVector
from sa_lens.steering import safety_hooks

__all__ = ["METHODS", "layer_intervention", "layer_sweep", "restrict_to_layers"]

METHODS = ("directional_ablation", "safe_align", "harm_removal")


def restrict_to_layers(hv: HarmVector, layers: Sequence[int]) -> HarmVector:
    """``hv.restrict(layers=layers)`` (embeddings, final norm and others dropped), refusing an empty result.

    Raises:
        ValueError: no parameter of ``hv`` belongs to those layers, or a negative layer.
    """
    kept = hv.restrict(layers=set(layers))
    if not len(kept):
        raise InputError(f"The harm vector has no parameters in layers {sorted(set(layers))}.")
    return kept


def _check(method: str, sv: SafetyVector | None, hv: HarmVector | None) -> None:
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}; got {method!r}.")
    if method == "harm_removal" and hv is None:
        raise InputError("harm_removal needs hv=HarmVector.")
    if method != "harm_removal" and sv is None:
        raise InputError(f"{method} needs sv=SafetyVector.")


@contextlib.contextmanager
def layer_intervention(
    model: TransformerBridge,
    method: str,
    layer: int,
    *,
    sv: SafetyVector | None = None,
    hv: HarmVector | None = None,
    alpha: float = DEFAULT_ALPHA,
    lam: float = DEFAULT_LAM,
    site: str = "resid_post",
) -> Iterator[TransformerBridge]:
    """One intervention at one layer, active inside the block (hooks removed / weights restored on exit).

    Args:
        model: the bridge.
        method: ``directional_ablation``, ``safe_align`` or ``harm_removal``.
        layer: the layer index.
        sv: the safety/harm direction (ablation and Safe-Align).
        hv: the harm vector (HDR).
        alpha: Safe-Align α.
        lam: HDR λ.
        site: where directional ablation removes the direction (``resid_post`` by default, where the
            vector was read; ``resid_pre``, ``attn_out``, ``mlp_out`` also accepted).

    Raises:
        ValueError: an unknown method, or the vector the method needs is missing.
    """
    _check(method, sv, hv)
    if method == "harm_removal":
        with harm_removal(model, restrict_to_layers(hv, [layer]), lam):
            yield model
        return
    hooks = (safety_hooks(sv, layers=[layer], site=site, formula="ablate") if method == "directional_ablation"
             else safety_hooks(sv, alpha, layers=[layer]))
    with model.hooks(fwd_hooks=hooks):
        yield model


def _rows(method: str, layer: int | None, result) -> list[dict]:
    return [
        {"method": method, "layer": pd.NA if layer is None else layer, "set": set_name, "metric": metric,
         "value": r.value, "n": r.n, "ci_low": r.low, "ci_high": r.high}
        for set_name, metrics in result.metrics.items() for metric, r in metrics.items()
    ]


def layer_sweep(
    model: TransformerBridge,
    sets: Sequence[EvalSet],
    method: str,
    layers: Sequence[int] | None = None,
    *,
    baseline: bool = True,
    batch_size: int = 32,
    progress: bool = True,
    **options,
) -> pd.DataFrame:
    """Measure ``method`` at each layer in turn (greedy generation, keyword judge).

    Args:
        model: the bridge.
        sets: evaluation sets (``harmful`` → ``asr`` and ``degenerate``, ``safe`` → ``over_refusal``,
            ``qa`` → ``utility``; see :class:`sa_lens.evaluation.runner.EvalSet`).
        method: ``directional_ablation``, ``safe_align`` or ``harm_removal``.
        layers: layers to try (all by default).
        baseline: also measure the model without intervention (rows with ``layer`` NA).
        batch_size: prompts per generation batch.
        progress: show a progress bar.
        **options: ``sv``, ``hv``, ``alpha``, ``lam``, ``site`` of :func:`layer_intervention`.

    Returns:
        Tidy rows ``method, layer, set, metric, value, n, ci_low, ci_high``; values are fractions in [0, 1].
        Cost: (len(layers) + baseline) generation passes over every set.
    """
    _check(method, options.get("sv"), options.get("hv"))  # before minutes of baseline generation
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    rows: list[dict] = []
    if baseline:
        rows += _rows(method, None, evaluate_state(model, sets, batch_size=batch_size))
    for layer in tqdm(layers, desc=method, disable=not progress, leave=False):
        with layer_intervention(model, method, layer, **options):
            rows += _rows(method, layer, evaluate_state(model, sets, batch_size=batch_size))
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    return df

