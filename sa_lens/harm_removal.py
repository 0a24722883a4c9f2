"""Harm Direction Removal as an in-place, exactly restored weight edit: θ̂ = θt − λ·τH′ (paper §3.1, eq. 3).

The context manager saves the original values only where τH′ is non-zero, edits those entries in
place, and writes the saved values back on exit — on normal exit, on any exception and on
KeyboardInterrupt. Restoring by "subtract, then add back" is never used: it is not exact in bf16/fp16.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator

import torch
from torch import Tensor

from sa_lens.harm_vector import HarmVector, ModelLike, checkpoint_parameters

__all__ = ["apply_harm_removal", "harm_removal"]

# Above this density a full copy of the tensor is cheaper than values + int64 indices (4 vs 12 bytes/entry).
_DENSE_SAVE_ABOVE = 1 / 3


def _resolve_targets(model: ModelLike, hv: HarmVector) -> dict[str, Tensor]:
    params = checkpoint_parameters(model)
    missing = sorted(set(hv.deltas) - set(params))
    if missing:
        raise ValueError(
            f"The harm vector has {len(missing)} parameter(s) the target lacks (e.g. {missing[:3]}). "
            "Build τH from checkpoints of the target's architecture, or keep only shared keys with "
            "HarmVector({k: v for k, v in hv.items() if k in target_keys})."
        )
    for name, delta in hv.items():
        if params[name].shape != delta.shape:
            raise ValueError(
                f"Parameter '{name}' has shape {tuple(params[name].shape)} in the target but "
                f"{tuple(delta.shape)} in the harm vector; they come from different architectures."
            )
        if not params[name].is_contiguous():
            raise ValueError(f"Target parameter '{name}' is not contiguous; call .contiguous() on the model first.")
    return {name: params[name] for name in hv.deltas}


def _edit_sites(targets: dict[str, Tensor], hv: HarmVector) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """Per parameter: its flat view, the flat τH′ on its device, and the edited indices (None = dense)."""
    for name, delta in hv.items():
        flat = targets[name].data.view(-1)
        d = delta.view(-1).to(flat.device)
        idx = torch.nonzero(d).squeeze(1)
        if idx.numel() == 0:
            continue
        yield flat, d, (None if idx.numel() > _DENSE_SAVE_ABOVE * flat.numel() else idx)


def _subtract(flat: Tensor, d: Tensor, idx: Tensor | None, lam: float) -> None:
    work = torch.promote_types(flat.dtype, torch.float32)  # fp32 arithmetic, fp64 kept as fp64
    if idx is None:
        flat.copy_((flat.to(work) - lam * d.to(work)).to(flat.dtype))
    else:
        flat[idx] = (flat[idx].to(work) - lam * d[idx].to(work)).to(flat.dtype)


def _check_lam(lam: float) -> None:
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam):
        raise ValueError(f"lam (λ) must be a finite number, got {lam!r}.")


def apply_harm_removal(model: ModelLike, hv: HarmVector, lam: float = 3.0) -> ModelLike:
    """Permanent HDR: θ̂ = θt − λ·τH′ written into the model's weights, nothing saved (paper §3.1, eq. 3).

    For export (``model.save_pretrained`` on the edited model, or ``sa-lens apply``); use the
    :func:`harm_removal` context manager to edit and restore in a session.

    Returns:
        The same model, edited.

    Raises:
        ValueError: as :func:`harm_removal`.
    """
    _check_lam(lam)
    targets = _resolve_targets(model, hv)
    with torch.no_grad():
        for flat, d, idx in _edit_sites(targets, hv):
            _subtract(flat, d, idx, lam)
    return model


@contextlib.contextmanager
def harm_removal(model: ModelLike, hv: HarmVector, lam: float = 3.0) -> Iterator[ModelLike]:
    """Subtract λ·τH′ from the target's weights inside a ``with`` block; restore them bit-exactly on exit.

    Args:
        model: the target θt — a ``TransformerBridge`` with raw weights, an HF model, or a state dict.
        hv: the (usually trimmed) harm vector, keyed by checkpoint names.
        lam: λ, the scale of the subtracted vector; the paper uses 3 with top-10 % TIES (HDR†) and
            0.1–6 for the untrimmed task vector (HDR‡), paper-notes.md §2.5.

    Yields:
        The same model, edited in place: θ̂ = θt − λ·τH′ computed in fp32 and cast to the weight dtype.

    Raises:
        ValueError: λ not finite, names/shapes that do not match the target, or a bridge whose weights
            were processed by ``enable_compatibility_mode()``. Nothing is changed when it raises.
        RuntimeError: on exit, when the block replaced the model's parameter tensors (e.g. ``.to()``),
            so the saved originals could not be written back.

    Memory: the saved originals take nnz(τH′) × (dtype bytes + 8 index bytes), or one full copy of a
    tensor when more than a third of it is edited. Nesting and re-entry are safe: each block restores
    what it saw on entry, and blocks exit in reverse order.
    """
    _check_lam(lam)
    targets = _resolve_targets(model, hv)
    entry_storage = {name: t.data_ptr() for name, t in targets.items()}
    saved: list[tuple[Tensor, Tensor | None, Tensor]] = []
    try:
        with torch.no_grad():
            for flat, d, idx in _edit_sites(targets, hv):
                saved.append((flat, idx, flat[idx].clone()) if idx is not None else (flat, None, flat.clone()))
                _subtract(flat, d, idx, lam)
        yield model
    finally:
        with torch.no_grad():
            for flat, idx, original in reversed(saved):
                if idx is None:
                    flat.copy_(original)
                else:
                    flat[idx] = original
        # A .to()/.half()/.cuda() inside the block builds new parameter tensors; the restore above then
        # lands in the old storage and the model keeps the edit. Say so rather than pretend it is restored.
        live = {n: t.data_ptr() for n, t in checkpoint_parameters(model).items() if n in targets}
        replaced = [n for n, ptr in entry_storage.items() if live.get(n) != ptr]
        if replaced:
            raise RuntimeError(
                f"{len(replaced)} parameter(s) (e.g. '{replaced[0]}') were replaced inside the harm_removal block "
                "(.to(), .half(), .cuda(), load_state_dict(assign=True) …), so the originals could not be written "
                "back and the model still holds the edit. Move or cast the model before entering the block."
            )
