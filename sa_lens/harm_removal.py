"""Harm Direction Removal as an in-place, exactly restored weight edit: θ̂ = θt − λ·τH′ (paper §3.1, eq. 3).

The context manager saves the original values only where τH′ is non-zero, edits those entries in
place, and writes the saved values back on exit — on normal exit, on any exception and on
KeyboardInterrupt. Restoring by "subtract, then add back" is never used: it is not exact in bf16/fp16.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sa_lens.bridge import is_bridge
from sa_lens.defaults import DEFAULT_LAM
from sa_lens.errors import InputError
from sa_lens.harm_vector import HarmVector, ModelLike, checkpoint_parameters
from sa_lens.memory import release_freed_memory
from sa_lens.models import offloaded_weights
from sa_lens.sparse_delta import DENSE_ABOVE
from sa_lens.validation import is_finite_real

__all__ = ["HarmRemovalBlock", "apply_harm_removal", "harm_removal"]


def _resolve_targets(model: ModelLike, hv: HarmVector) -> dict[str, Tensor]:
    params = checkpoint_parameters(model)
    missing = sorted(set(hv.deltas) - set(params))
    if missing:
        raise InputError(
            f"The harm vector has {len(missing)} parameter(s) the target lacks (e.g. {missing[:3]}). "
            "Build τH from checkpoints of the target's architecture, or keep only shared keys with "
            "HarmVector.load(path, target=model, restrict=True)."
        )
    for name, delta in hv.items():
        if tuple(params[name].shape) != tuple(delta.shape):
            raise InputError(
                f"Parameter '{name}' has shape {tuple(params[name].shape)} in the target but "
                f"{tuple(delta.shape)} in the harm vector; they come from different architectures."
            )
        if not params[name].is_contiguous():
            raise InputError(f"Target parameter '{name}' is not contiguous; call .contiguous() on the model first.")
    targets = {name: params[name] for name in hv.deltas}
    _refuse_placeholders(model, targets)
    return targets


def _refuse_placeholders(model: ModelLike, targets: dict[str, Tensor]) -> None:
    """Raise InputError when an edited parameter holds no weights: on the meta device, or offloaded by accelerate.

    An offloaded parameter (a device map with ``"cpu"`` / ``"disk"`` next to GPUs, ``cpu_offload``,
    ``disk_offload``) is a meta placeholder whose values accelerate copies in from its offload store for each
    forward pass and drops after: an edit would change the placeholder (or a copy that is thrown away), never
    the weights the model runs with.
    """
    root = model.original_model if is_bridge(model) else model
    offloaded = offloaded_weights(root) if isinstance(root, torch.nn.Module) else {}
    bad = [name for name, t in targets.items() if t.device.type == "meta" or id(t) in offloaded]
    if bad:
        where = "offloaded by accelerate to CPU or disk" if id(targets[bad[0]]) in offloaded else "on the meta device"
        raise InputError(
            f"{len(bad)} parameter(s) the harm vector edits hold no weights in this model (e.g. '{bad[0]}' is "
            f"{where}), so harm_removal would edit placeholders. Load the model without CPU/disk offload (a "
            "device map over GPUs only, n_devices=, or one device), or write the edited model from checkpoint "
            "folders, one shard at a time: sa_lens.export_harm_removed(target_folder, hv, out_dir, lam), or "
            "sa_lens.export_harm_removed_streamed(base, harmful, target, out_dir, lam) without holding τH′."
        )


@dataclass
class _Site:
    """One edited parameter: its flat view, the flat τH′ values to subtract, and where (None = everywhere)."""

    flat: Tensor
    delta: Tensor  # dense flat τH′ when idx is None, else τH′ at idx
    idx: Tensor | None
    name: str = ""


def _edit_sites(targets: dict[str, Tensor], hv: HarmVector) -> Iterator[_Site]:
    for name in hv.deltas:
        flat = targets[name].data.view(-1)
        sparse = hv.sparse(name)
        if sparse.nnz == 0:
            continue
        if sparse.nnz > DENSE_ABOVE * flat.numel():  # a full copy is cheaper than values + int64 indices
            yield _Site(flat, hv.dense(name).reshape(-1).to(flat.device), None, name)
        else:
            yield _Site(flat, sparse.values.to(flat.device), sparse.indices.to(flat.device), name)


@dataclass(eq=False)
class _Level:
    """One entered block: what it saved, and earlier-entered blocks whose exit came while it was active."""

    seq: int  # entry order over all blocks
    storage: dict[str, int]  # name → data_ptr at entry
    saved: list[tuple[_Site, Tensor]] = field(default_factory=list)
    deferred: list[_Level] = field(default_factory=list)

    def flatten(self) -> list[_Level]:
        return [self, *(lvl for d in self.deferred for lvl in d.flatten())]


_SEQ = itertools.count()
# Every entered, not yet restored block (all models), in entry order. Weak: a block abandoned without
# exit (a notebook cell) must not keep its saved originals alive once its HarmRemovalBlock is gone.
_ACTIVE: list[weakref.ref[_Level]] = []


def _subtract(site: _Site, lam: float, old: Tensor | None = None) -> None:
    """θ̂ = θ − λ·τ at the site's entries; ``old`` = the current values there when already read (saves a copy)."""
    flat, d, idx = site.flat, site.delta, site.idx
    work = torch.promote_types(flat.dtype, torch.float32)  # fp32 arithmetic, fp64 kept as fp64
    if old is None:
        old = flat if idx is None else flat[idx]
    # −(λ·τ) + θ is θ − λ·τ bit for bit (a fused sub_(alpha=λ) is not), with one fp32 temporary.
    new = (d.to(work) * lam).neg_().add_(old.to(work)).to(flat.dtype)
    # A finite λ can still overflow the weight dtype (fp16 tops out at 65504): refuse rather than write inf.
    if not bool((torch.isfinite(new) | ~torch.isfinite(old)).all()):
        raise InputError(
            f"θt − λ·τH′ overflows {flat.dtype} in '{site.name}' with λ = {lam}; use a smaller λ or a wider weight dtype."
        )
    if idx is None:
        flat.copy_(new)
    else:
        flat[idx] = new


def check_lam(lam: float) -> None:
    """Raise ValueError unless λ is a finite real number (NaN/inf would silently destroy the weights)."""
    if not is_finite_real(lam):
        raise InputError(f"lam (λ) must be a finite number, got {lam!r}.")


def apply_harm_removal(model: ModelLike, hv: HarmVector, lam: float = DEFAULT_LAM) -> ModelLike:
    """Permanent HDR: θ̂ = θt − λ·τH′ written into the model's weights, all or nothing (paper §3.1, eq. 3).

    For export (:func:`sa_lens.export.export_harm_removed`, ``sa-lens apply``); use the
    :func:`harm_removal` context manager to edit and restore in a session.

    Returns:
        The same model, edited.

    Raises:
        ValueError: as :func:`harm_removal`, or a :func:`harm_removal` block not yet exited edits the same
            parameters; the weights are then left as they were.
    Memory: the originals of the edited entries are held until the edit completes (as inside the block).
    """
    hr = HarmRemovalBlock(model, hv, lam)
    # An open block's exit writes back what it saved: this edit would be undone where the two overlap and
    # kept elsewhere, a model that is neither. Refused before any edit.
    ptrs = {t.data_ptr() for t in hr.targets.values() if t.numel()}  # empty tensors may all sit at address 0
    active = [level for level in (ref() for ref in _ACTIVE) if level is not None]
    if ptrs & {p for level in active for lvl in level.flatten() for p in lvl.storage.values()}:
        raise InputError(
            "apply_harm_removal inside a harm_removal block that edits the same parameters: the block's exit "
            "would undo this edit only where the two overlap. Apply it after the block exits."
        )
    # Edited as the context manager does, so a failure half way (an overflowing tensor, Ctrl-C) restores the
    # tensors already edited; on success the saved originals are dropped instead of written back.
    hr.__enter__()
    hr._commit()
    return model


class HarmRemovalBlock(contextlib.AbstractContextManager):
    """The context manager :func:`harm_removal` returns; ``with`` gives the edited model.

    Attributes:
        restore_nbytes: bytes held to restore the weights while inside the block: for each sparsely
            edited parameter the original values (weight dtype) and their int64 indices, for a densely
            edited one (over a third of it changed) a full copy. 0 outside the block. For a top-k τH′
            this is ≈ nnz × (dtype bytes + 8).
        edited: number of weight entries the edit changed (nnz of τH′), 0 outside the block.

    Entering the same object again while inside it (re-entry) stacks: each level saves what it sees and
    restores it on its own exit, so nested blocks unwind in reverse order. A block that exits while a
    block entered after it still edits the same parameters (``__exit__`` called out of order) cannot
    restore yet — its originals would be overwritten by the later block's exit — so its restore is
    handed to that block and runs when it exits (a ``RuntimeWarning`` says so); the final weights are
    still bit-exact.
    """

    def __init__(self, model: ModelLike, hv: HarmVector, lam: float) -> None:
        check_lam(lam)
        self.model, self.hv, self.lam = model, hv, lam
        self.targets = _resolve_targets(model, hv)  # fail before any edit on a mismatched vector
        self._levels: list[_Level] = []

    @property
    def restore_nbytes(self) -> int:
        return sum(
            original.nbytes + (site.idx.nbytes if site.idx is not None else 0)
            for level in self._levels
            for site, original in level.saved
        )

    @property
    def edited(self) -> int:
        return sum(
            (site.idx.numel() if site.idx is not None else int(torch.count_nonzero(site.delta)))
            for level in self._levels[-1:]
            for site, _ in level.saved
        )

    def __enter__(self) -> ModelLike:
        # Resolved again: the model may have been moved or cast between harm_removal(...) and the `with`.
        self.targets = _resolve_targets(self.model, self.hv)
        level = _Level(next(_SEQ), {name: t.data_ptr() for name, t in self.targets.items()})
        saved = level.saved
        self._levels.append(level)
        _ACTIVE.append(weakref.ref(level))
        try:
            with torch.no_grad():
                for site in _edit_sites(self.targets, self.hv):
                    # Save before editing: an interruption between the two leaves nothing unrecorded.
                    # (Advanced indexing already copies: no second clone of the sparse originals.)
                    original = site.flat[site.idx] if site.idx is not None else site.flat.clone()
                    saved.append((site, original))
                    _subtract(site, self.lam, original)
            # Inside the try: a Ctrl-C during the trim (it walks the whole heap) must restore too, since a
            # `with` whose __enter__ raises never calls __exit__. _restore trims after writing back.
            release_freed_memory()  # the fp32 intermediates of every edited tensor
        except BaseException:
            self._restore()
            raise
        return self.model

    def __exit__(self, *exc) -> None:
        self._restore()

    def _commit(self) -> None:
        """Keep the newest level's edit: drop its saved originals instead of writing them back."""
        level = self._levels.pop()
        _ACTIVE[:] = [ref for ref in _ACTIVE if ref() is not None and ref() is not level]
        level.saved.clear()
        release_freed_memory()

    def _restore(self) -> None:
        level = self._levels.pop()
        _ACTIVE[:] = [ref for ref in _ACTIVE if ref() is not None and ref() is not level]
        ptrs = {p for lvl in level.flatten() for p in lvl.storage.values()}
        active = [m for m in (ref() for ref in _ACTIVE) if m is not None]
        later = [m for m in active if m.seq > level.seq and ptrs & {p for lvl in m.flatten() for p in lvl.storage.values()}]
        if later:
            later[-1].deferred.append(level)
            warnings.warn(
                "harm_removal blocks exited out of order: a block entered later still edits the same parameters, "
                "so this block's weights are restored when that one exits (exit blocks in reverse order of entry).",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        levels = sorted(level.flatten(), key=lambda lvl: lvl.seq, reverse=True)  # later-entered first
        _write_back([op for lvl in levels for op in reversed(lvl.saved)])
        for lvl in levels:  # written back: drop the originals now, not when the last reference goes
            lvl.saved.clear()
        release_freed_memory()
        entry_storage = {n: ptr for lvl in levels for n, ptr in lvl.storage.items()}
        # A .to()/.half()/.cuda() inside the block builds new parameter tensors; the restore above then
        # lands in the old storage and the model keeps the edit. Say so rather than pretend it is restored.
        live = {n: t.data_ptr() for n, t in checkpoint_parameters(self.model).items() if n in entry_storage}
        replaced = [n for n, ptr in entry_storage.items() if live.get(n) != ptr]
        if replaced:
            raise RuntimeError(
                f"{len(replaced)} parameter(s) (e.g. '{replaced[0]}') were replaced inside the harm_removal block "
                "(.to(), .half(), .cuda(), load_state_dict(assign=True) …), so the originals could not be written "
                "back and the model still holds the edit. Move or cast the model before entering the block."
            )


def _write_back(ops: list[tuple[_Site, Tensor]]) -> None:
    """Write the saved originals back, in order, to the end even through KeyboardInterrupt.

    A second Ctrl-C while a large edit is being restored (seconds on a 7B model) would otherwise stop the
    loop half way, and the popped level could never finish it: the weights would stay partly edited. Each
    write is idempotent, so an interrupted one is simply redone; the first interruption is re-raised after.
    """
    interrupted: BaseException | None = None
    i = 0
    with torch.no_grad():
        while i < len(ops):
            try:
                while i < len(ops):
                    site, original = ops[i]
                    if site.idx is None:
                        site.flat.copy_(original)
                    else:
                        site.flat[site.idx] = original
                    i += 1
            except KeyboardInterrupt as exc:
                interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def harm_removal(model: ModelLike, hv: HarmVector, lam: float = DEFAULT_LAM) -> HarmRemovalBlock:
    """Subtract λ·τH′ from the target's weights inside a ``with`` block; restore them bit-exactly on exit.

    Args:
        model: the target θt — a ``TransformerBridge`` with raw weights, an HF model, or a state dict.
        hv: the (usually trimmed) harm vector, keyed by checkpoint names; dense or sparse entries.
        lam: λ, the scale of the subtracted vector; the paper uses 3 with top-10 % TIES (HDR†) and
            0.1–6 for the untrimmed task vector (HDR‡), paper-notes.md §2.5.

    Returns:
        A :class:`HarmRemovalBlock`; ``with harm_removal(...) as m`` edits in place and gives the same model:
        θ̂ = θt − λ·τH′ computed in fp32 and cast to the weight dtype. Its ``restore_nbytes`` tells
        what the restore holds.

    Raises:
        ValueError: λ not finite, names/shapes that do not match the target, a bridge whose weights
            were processed by ``enable_compatibility_mode()``, or an edited parameter that holds no weights
            (on the meta device, or offloaded to CPU/disk by accelerate: load without offload, or export with
            :func:`sa_lens.export_harm_removed` from the checkpoint folder) — raised by this call, before any edit;
            on entry, an edit that overflows the weight dtype (e.g. a huge λ in fp16), after restoring
            what was already edited.
        RuntimeError: on exit, when the block replaced the model's parameter tensors (e.g. ``.to()``),
            so the saved originals could not be written back.

    Memory: the saved originals take nnz(τH′) × (dtype bytes + 8 index bytes), or one full copy of a
    tensor when more than a third of it is edited. Nesting and re-entry are safe: each block restores
    what it saw on entry, and blocks exit in reverse order. Never "subtract then add back" (not exact in
    bf16/fp16; anchors.md §4.1).
    """
    return HarmRemovalBlock(model, hv, lam)
