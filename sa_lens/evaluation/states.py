"""The model states of the paper's tables as interventions for :func:`sa_lens.evaluate`.

Original, HDR (θt − λ·τH′), Safe-Align (ICV hooks on θt) and Safety Arithmetic (HDR, then the ICV read
from θ̂ and injected), paper-notes.md §2-3 and §4.6.
"""

from __future__ import annotations

from collections.abc import Sequence

from sa_lens.defaults import DEFAULT_ALPHA, DEFAULT_LAM
from sa_lens.errors import InputError
from sa_lens.harm_vector import HarmVector
from sa_lens.interventions import Compose, HarmRemoval, Intervention, SafeAlign

__all__ = ["STATE_NAMES", "safety_arithmetic_states"]

STATE_NAMES: tuple[str, ...] = ("Original", "HDR", "Safe-Align", "Safety Arithmetic")


def safety_arithmetic_states(
    hv: HarmVector,
    pairs: Sequence[tuple[str, str]],
    lam: float = DEFAULT_LAM,
    alpha: float = DEFAULT_ALPHA,
    which: Sequence[str] = STATE_NAMES,
) -> dict[str, Intervention]:
    """State name → intervention, for the paper's four rows.

    Args:
        hv: the trimmed harm vector τH′.
        pairs: (unsafe, safe) demonstration texts for the ICV; the ICV is read when the state is applied,
            from θt for Safe-Align and from θ̂ for Safety Arithmetic, as the paper does.
        lam: λ of HDR.
        alpha: α of Safe-Align.
        which: the states wanted, a subset of :data:`STATE_NAMES`, in report order.

    Raises:
        ValueError: an unknown state name, or an invalid λ, α or pair (checked here, before any run).
    """
    unknown = [w for w in which if w not in STATE_NAMES]
    if unknown:
        raise InputError(f"unknown state(s) {unknown}; choose from {', '.join(STATE_NAMES)}.")
    hdr, safe_align = HarmRemoval(hv, lam), SafeAlign(pairs=tuple(pairs), alpha=alpha)
    states: dict[str, Intervention] = {
        "Original": Compose(),
        "HDR": hdr,
        "Safe-Align": safe_align,
        "Safety Arithmetic": Compose((hdr, safe_align)),
    }
    return {name: states[name] for name in which}
