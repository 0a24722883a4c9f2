"""Where a knowledge edit changed the model: the EDIT scenario's edit area (paper Eqs. 11–13, paper-notes.md §2.4).

The paper puts layer l in the edit area when θb and θedit differ at layer l, l−1 or l+1, and restricts HDR to
it; the official code hard-codes layers 4–6 instead (paper-notes.md §2.3, §7.6). ``detect_edit_area`` finds
the changed tensors by comparing the two models bit for bit, streaming from checkpoint folders (one tensor
pair in memory) or reading in-memory models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from sa_lens.checkpoints import (
    Checkpoint,
    check_same_layout,
    check_same_names,
    paired_names,
)
from sa_lens.errors import InputError
from sa_lens.harm_vector import HarmVector, ModelLike, checkpoint_parameters
from sa_lens.parameter_names import layer_count, layer_index, select_names
from sa_lens.topk import Count

__all__ = ["VARIANTS", "EditArea", "detect_edit_area", "edit_area_vector"]

VARIANTS = ("paper", "official")
"""How HDR treats the edit area: ``paper`` (Eqs. 11–13: τH zero outside it, top-k within it) or ``official``
(the official code: top-k within the area, the full untrimmed τH kept outside it; paper-notes.md §2.3)."""


@dataclass(frozen=True)
class EditArea:
    """The result of :func:`detect_edit_area`.

    Attributes:
        tensors: checkpoint names of the parameters that differ (bit-level).
        changed_layers: decoder layers holding at least one of them.
        layers: ``changed_layers`` widened by ``neighbours`` on each side, clipped to the model — the
            paper's edit area; pass it as ``layers=`` to ``HarmVector.from_checkpoints``/``from_models``
            or ``HarmVector.restrict``.
    """

    tensors: tuple[str, ...]
    changed_layers: tuple[int, ...]
    layers: tuple[int, ...]


def detect_edit_area(
    base: ModelLike | str | os.PathLike,
    edited: ModelLike | str | os.PathLike,
    *,
    neighbours: int = 1,
    progress: bool = True,
) -> EditArea:
    """Find the tensors and layers where ``edited`` differs from ``base`` (paper Eq. 11).

    Args:
        base: θb — a checkpoint folder (streamed) or a bridge / HF model / state dict.
        edited: θedit, the same architecture after a knowledge edit (e.g. ROME), of the same kind.
        neighbours: layers added on each side of a changed one (1 = the paper's l−1, l, l+1).
        progress: a tqdm bar over the compared tensors.

    Returns:
        The :class:`EditArea`; empty tuples when nothing differs.

    Raises:
        ValueError: names, shapes or dtypes differ, ``neighbours`` is negative, one folder and one
            in-memory model, or the folder errors of
            :class:`~sa_lens.checkpoints.Checkpoint`.
    """
    if not isinstance(neighbours, int) or neighbours < 0:
        raise InputError(f"neighbours must be a non-negative number of layers; got {neighbours!r}.")
    folders = isinstance(base, (str, os.PathLike)), isinstance(edited, (str, os.PathLike))
    if folders[0] != folders[1]:
        raise InputError(
            "detect_edit_area compares two checkpoint folders or two in-memory models, not one of each; "
            "pass both as folders (streamed) or load both with sa_lens.load_hf_model."
        )
    if all(folders):
        cb, ce = Checkpoint(base), Checkpoint(edited)
        names = paired_names(cb, ce)
        pairs = ((n, cb.read(n), ce.read(n)) for n in names)
    else:
        pb, pe = checkpoint_parameters(base), checkpoint_parameters(edited)
        check_same_names(pb, pe)
        names = list(pb)
        for n in names:
            check_same_layout(n, pb[n].shape, pe[n].shape, pb[n].dtype, pe[n].dtype)
        pairs = ((n, pb[n].detach(), pe[n].detach()) for n in names)
    # Bit patterns, not values: -0.0 vs 0.0 or a NaN payload is still a change someone made.
    changed = tuple(
        n for n, b, e in tqdm(pairs, total=len(names), desc="edit area", disable=not progress)
        if not torch.equal(b.reshape(-1).view(torch.uint8), e.reshape(-1).view(torch.uint8))
    )
    changed_layers = sorted({i for i in map(layer_index, changed) if i is not None})
    n_layers = layer_count(names)
    area = sorted({j for i in changed_layers for j in range(i - neighbours, i + neighbours + 1) if 0 <= j < n_layers})
    return EditArea(changed, tuple(changed_layers), tuple(area))


def edit_area_vector(
    hv: HarmVector, layers: tuple[int, ...] | list[int], top_k: float | None = 0.10, variant: str = "paper",
    count: Count = "official",
) -> HarmVector:
    """τH for HDR in the EDIT scenario: trimmed to its top-k by magnitude *within* the edit area.

    Args:
        hv: the untrimmed harm vector τH = θH − θb over the whole model.
        layers: the edit area (:attr:`EditArea.layers`).
        top_k: fraction kept within the area (global threshold over the area's parameters); None = no trim
            (the task-vector baseline restricted to the area, as the official code's HDR‡ mask is).
        variant: ``"paper"`` (default; zero outside the area, paper Eqs. 11–13) or ``"official"`` (the untrimmed
            τH outside the area as well, as the official code subtracts it; paper-notes.md §2.3, §7.6).
        count: the trim's counting rule (:meth:`HarmVector.trim`).

    Returns:
        A new :class:`HarmVector`; its ``meta`` records the area and the variant.

    Raises:
        ValueError: an unknown variant, an empty area, or no parameter of ``hv`` in it.
    """
    if variant not in VARIANTS:
        raise InputError(f"variant must be one of {VARIANTS}; got {variant!r}.")
    if variant == "official" and (hv.meta.get("layers") is not None or hv.meta.get("kinds") is not None):
        raise InputError("variant='official' keeps τH outside the edit area, so it needs the whole τH; this one is "
                         "already restricted (meta layers/kinds). Build it without layers=/kinds=.")
    layers = tuple(sorted(set(layers)))
    if not layers:
        raise InputError("The edit area is empty: the edited model does not differ from the base in any decoder "
                         "layer. Check that --target is the edited model and --base the model it was edited from.")
    inside = hv.restrict(layers=layers)
    if not inside.deltas:
        raise InputError(f"The harm vector has no parameter in the edit area {list(layers)}.")
    if top_k is not None:
        inside = inside.trim(top_k, scope="global", count=count)
    deltas = dict(inside.deltas)
    meta = {**inside.meta, "edit_area": list(layers), "edit_area_variant": variant}
    if variant == "official":
        kept = set(select_names(hv.deltas, layers=layers))
        deltas |= {n: d for n, d in hv.deltas.items() if n not in kept}
        # Every layer is in the vector again: its provenance keeps hv's own restriction, not the area's.
        meta.pop("layers", None)
        meta |= {"layers": hv.meta["layers"]} if "layers" in hv.meta else {}
    return HarmVector(deltas, meta)
