"""The model states of the paper's tables as context-manager factories for :func:`sa_lens.evaluate`.

Original, HDR (θt − λ·τH′), Safe-Align (ICV hooks on θt) and Safety Arithmetic (HDR, then the ICV read
from θ̂ and injected), paper-notes.md §2-3 and §4.6.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

from sa_lens.defaults import DEFAULT_ALPHA, DEFAULT_LAM
from sa_lens.errors import InputError
from sa_lens.harm_vector import HarmVector
from sa_lens.lens import SafetyLens
from sa_lens.safety_vector import SafetyVector

__all__ = ["STATE_NAMES", "safety_arithmetic_states"]

STATE_NAMES: tuple[str, ...] = ("Original", "HDR", "Safe-Align", "Safety Arithmetic")


def safety_arithmetic_states(
    lens: SafetyLens,
    hv: HarmVector,
    pairs: Sequence[tuple[str, str]],
    lam: float = DEFAULT_LAM,
    alpha: float = DEFAULT_ALPHA,
    which: Sequence[str] = STATE_NAMES,
) -> dict[str, Callable[[], AbstractContextManager]]:
    """State name → factory of the context manager that puts ``lens.model`` in that state.

    Args:
        lens: the target model's lens.
        hv: the trimmed harm vector τH′.
        pairs: (unsafe, safe) demonstration texts for the ICV; the ICV is extracted on entry, from θt for
            Safe-Align and from θ̂ for Safety Arithmetic, as the paper does.
        lam: λ of HDR.
        alpha: α of Safe-Align.
        which: the states wanted, a subset of :data:`STATE_NAMES`, in report order.

    Raises:
        ValueError: an unknown state name.

    Resuming an ``out_dir`` with another ``alpha`` or other ``pairs``: the Safe-Align hooks sit at the same
    hook points, so the resume key cannot tell the states apart — use another folder (``sa-lens run`` refuses).
    """
    unknown = [w for w in which if w not in STATE_NAMES]
    if unknown:
        raise InputError(f"unknown state(s) {unknown}; choose from {', '.join(STATE_NAMES)}.")

    @contextlib.contextmanager
    def safe_align():
        with lens.safety_alignment(SafetyVector.from_pairs(lens.model, pairs), alpha):
            yield

    factories: dict[str, Callable[[], AbstractContextManager]] = {
        "Original": contextlib.nullcontext,
        "HDR": lambda: lens.harm_removal(hv, lam),
        "Safe-Align": safe_align,
        "Safety Arithmetic": lambda: lens.safety_arithmetic(hv, pairs, lam, alpha),
    }
    return {name: factories[name] for name in which}
