"""SafetyLens: one model, the two stages of Safety Arithmetic, and their combination (paper §3).

A notebook convenience over :mod:`sa_lens.interventions`, which every method here calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sa_lens.bridge import is_bridge
from sa_lens.defaults import DEFAULT_ALPHA, DEFAULT_LAM
from sa_lens.harm_removal import harm_removal
from sa_lens.harm_vector import HarmVector
from sa_lens.interventions import Compose, HarmRemoval, SafeAlign
from sa_lens.safety_vector import SafetyVector
from sa_lens.steering import HookFn, safety_hooks

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["SafetyLens"]


class SafetyLens:
    """The wrapper a notebook holds: HDR, Safe-Align and Safety Arithmetic on one ``TransformerBridge``.

    Every method that changes the model is a context manager: weights are restored bit-exactly and
    hooks removed when the block exits, also on error.
    """

    def __init__(self, model: TransformerBridge) -> None:
        if not is_bridge(model):
            raise TypeError(f"SafetyLens wraps a TransformerBridge (see sa_lens.load_model), got {type(model).__name__}.")
        self.model = model

    def harm_removal(self, hv: HarmVector, lam: float = DEFAULT_LAM) -> contextlib.AbstractContextManager:
        """HDR: θ̂ = θt − λ·τH′ inside the block (see :func:`sa_lens.harm_removal`)."""
        return harm_removal(self.model, hv, lam)

    def safety_hooks(
        self, sv: SafetyVector, alpha: float = DEFAULT_ALPHA, layers: Sequence[int] | None = None, **options
    ) -> list[tuple[str, HookFn]]:
        """Named Safe-Align hooks for this model; ``options`` are ``site``, ``formula``, ``positions`` and
        ``per_layer_alpha`` of :func:`sa_lens.safety_hooks`.

        Raises:
            ValueError: the vector's layer count, width or processing mode does not match this model.
        """
        return safety_hooks(sv, alpha, layers, model=self.model, **options)

    def safe_align(
        self, sv: SafetyVector, alpha: float = DEFAULT_ALPHA, layers: Sequence[int] | None = None, **options
    ) -> contextlib.AbstractContextManager[TransformerBridge]:
        """Safe-Align: the ICV hooks active inside the block (paper §3.2); ``options`` as :meth:`safety_hooks`.

        The same as ``SafeAlign(vector=sv, …).apply(model)`` (:mod:`sa_lens.interventions`).
        """
        return _safe_align(sv, alpha, layers, options).apply(self.model)

    def safety_arithmetic(
        self,
        hv: HarmVector,
        pairs: Sequence[tuple[str, str]] | SafetyVector,
        lam: float = DEFAULT_LAM,
        alpha: float = DEFAULT_ALPHA,
        layers: Sequence[int] | None = None,
    ) -> contextlib.AbstractContextManager[TransformerBridge]:
        """HDR then Safe-Align in one block; the ICV is extracted from the HDR-edited weights, as the paper does.

        The same as ``Compose([HarmRemoval(hv, lam), SafeAlign(pairs=pairs, alpha=alpha)]).apply(model)``.

        Args:
            hv: the trimmed harm vector.
            pairs: (unsafe, safe) demonstration pairs — the ICV is then computed on θ̂ — or a ready
                SafetyVector (used as is).
            lam: λ for HDR.
            alpha: α for Safe-Align.
            layers: layers to steer (all by default).

        Returns:
            A context manager yielding the edited, hooked model; on exit weights are restored and hooks removed.

        Raises:
            ValueError: λ, α, pairs or layers invalid, or a vector that does not fit the model.
        """
        source = pairs if isinstance(pairs, SafetyVector) else tuple(pairs)
        return Compose((HarmRemoval(hv, lam), _safe_align(source, alpha, layers, {}))).apply(self.model)


def _safe_align(source: SafetyVector | tuple, alpha: float, layers: Sequence[int] | None, options: dict) -> SafeAlign:
    options = dict(options)
    if "per_layer_alpha" in options:
        options["per_layer_alpha"] = tuple((options["per_layer_alpha"] or {}).items())
    vector_or_pairs = {"vector": source} if isinstance(source, SafetyVector) else {"pairs": source}
    # A lens steers with what the caller hands it, as safety_hooks does: the model-name check is the interventions' own.
    extra = {"allow_other_model": True} if isinstance(source, SafetyVector) else {}
    return SafeAlign(**vector_or_pairs, alpha=alpha, layers=layers, **(extra | options))
