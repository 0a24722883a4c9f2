"""SafetyLens: one model, the two stages of Safety Arithmetic, and their combination (paper §3)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from sa_lens.bridge import is_bridge
from sa_lens.defaults import DEFAULT_ALPHA, DEFAULT_LAM
from sa_lens.errors import InputError
from sa_lens.harm_removal import harm_removal
from sa_lens.harm_vector import HarmVector
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
            ValueError: the vector's layer count or width does not match this model.
        """
        cfg = self.model.cfg
        if (sv.n_layers, sv.d_model) != (cfg.n_layers, cfg.d_model):
            raise InputError(
                f"Safety vector is [{sv.n_layers}, {sv.d_model}] but the model has {cfg.n_layers} layers of "
                f"width {cfg.d_model}; extract the vector from this model (SafetyVector.from_pairs)."
            )
        return safety_hooks(sv, alpha, layers, **options)

    @contextlib.contextmanager
    def safety_alignment(
        self, sv: SafetyVector, alpha: float = DEFAULT_ALPHA, layers: Sequence[int] | None = None, **options
    ) -> Iterator[TransformerBridge]:
        """Safe-Align: the ICV hooks active inside the block (paper §3.2); ``options`` as :meth:`safety_hooks`."""
        with self.model.hooks(fwd_hooks=self.safety_hooks(sv, alpha, layers, **options)):
            yield self.model

    @contextlib.contextmanager
    def safety_arithmetic(
        self,
        hv: HarmVector,
        pairs: Sequence[tuple[str, str]] | SafetyVector,
        lam: float = DEFAULT_LAM,
        alpha: float = DEFAULT_ALPHA,
        layers: Sequence[int] | None = None,
    ) -> Iterator[TransformerBridge]:
        """HDR then Safe-Align in one block; the ICV is extracted from the HDR-edited weights, as the paper does.

        Args:
            hv: the trimmed harm vector.
            pairs: (unsafe, safe) demonstration pairs — the ICV is then computed on θ̂ — or a ready
                SafetyVector (used as is).
            lam: λ for HDR.
            alpha: α for Safe-Align.
            layers: layers to steer (all by default).

        Yields:
            The edited, hooked model; on exit weights are restored and hooks removed.
        """
        with self.harm_removal(hv, lam):
            sv = pairs if isinstance(pairs, SafetyVector) else SafetyVector.from_pairs(self.model, pairs)
            with self.safety_alignment(sv, alpha, layers):
                yield self.model
