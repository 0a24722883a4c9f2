"""θ̂ = θt − λ·τH′ from three checkpoint folders, never holding τH′ (paper §3.1, eq. 3; design.md §3, "Global
top-k at scale").

:func:`sa_lens.export.export_harm_removed` needs τH′ built in memory first (``HarmVector.from_checkpoints``
holds the kept entries: at 70B and top-10 % that is 7 B entries × 12 bytes). Here τ = θH − θb is read again
instead, piece by piece (whole rows, about 8M entries: :func:`~sa_lens.checkpoints.stream_pieces`), in passes:

1. **Threshold, first digit.** Every piece of τ adds to its group's histogram of the high 15 bits of |τ|'s
   float32 bit pattern (:func:`~sa_lens.topk.abs_bit_histogram`; it also refuses NaN and inf); the bin of
   the threshold and its rank inside the bin follow (:func:`~sa_lens.topk.threshold_bin`).
2. **Threshold, second digit.** A second sweep counts the low 16 bits of the entries in that bin
   (:func:`~sa_lens.topk.in_bin_histogram`), which gives t exactly (:func:`~sa_lens.topk.low_bits_at_rank`):
   the rank-th largest |τ| of the group, ``kthvalue``'s value, ties included.
3. **Write.** Tensors in name order; each is read by the same rows from θt, θb and θH, the kept entries of τ
   are chosen by :mod:`sa_lens.topk`'s rules — official: |τ| ≥ t; exact: |τ| > t, then the tied entries
   first by name, then flat index, up to the count — never an entry with τ = 0, and subtracted by
   :func:`~sa_lens.harm_removal.apply_harm_removal` (fp32, cast to the weight's dtype), so the result is the
   in-memory export's bit for bit. Each tensor goes to its planned place in the output shards
   (:class:`~sa_lens.export.ShardWriter`).

Memory: a few pieces (θt's, θb's and θH's rows, τ in fp32 and its bit patterns: about 150 MB at 8M entries),
a 256 KiB histogram per group, and nothing that grows with the model. Time: three reads of θb and θH, one of θt,
one write of θ̂.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from sa_lens.checkpoints import Checkpoint, paired_names, stream_pieces
from sa_lens.defaults import DEFAULT_LAM, DEFAULT_TOP_K
from sa_lens.errors import InputError
from sa_lens.export import (
    DEFAULT_MAX_SHARD_SIZE,
    HarmDigest,
    ShardWriter,
    check_out_dir,
    checkpoint_layout,
    finish_folder,
    read_tensor,
)
from sa_lens.harm_removal import apply_harm_removal, check_lam
from sa_lens.harm_vector import HarmVector, Scope, scope_grouping
from sa_lens.provenance import portable_name
from sa_lens.sparse_delta import SparseDelta
from sa_lens.topk import (
    Count,
    abs_bit_histogram,
    abs_bits,
    check_count,
    check_top_k,
    flat_where,
    in_bin_histogram,
    kept_rank,
    low_bits_at_rank,
    threshold_bin,
)

__all__ = ["GroupThreshold", "export_harm_removed_streamed", "thresholds"]

_NOTHING = 0x7FFFFFFF  # a bit pattern above every finite |τ|: a group that keeps nothing


@dataclass
class GroupThreshold:
    """What one top-k group keeps (:mod:`sa_lens.topk` states the rules).

    Attributes:
        size: entries in the group.
        rank: the threshold's rank from the largest (:func:`~sa_lens.topk.kept_rank`); above ``size``: every
            non-zero entry is kept; 0: none.
        bits: t's float32 bit pattern: entries with |τ| bits above it are kept.
        ties: how many entries tied at t are kept, first by name then flat index; None: all of them.
        kept: entries kept, counted while writing.
    """

    size: int = 0
    rank: int = 0
    bits: int = 0
    ties: int | None = 0
    kept: int = 0
    hist: Tensor = field(default_factory=lambda: torch.zeros(1 << 15, dtype=torch.int64), repr=False)

    @property
    def value(self) -> float | None:
        """t as a float (None where nothing or everything non-zero is kept, so there is no threshold)."""
        if not 0 < self.rank <= self.size:
            return None
        return float(np.array([self.bits], dtype=np.int32).view(np.float32)[0])


def export_harm_removed_streamed(
    base: str | os.PathLike,
    harmful: str | os.PathLike,
    target: str | os.PathLike,
    out_dir: str | os.PathLike,
    lam: float = DEFAULT_LAM,
    *,
    top_k: float | None = DEFAULT_TOP_K,
    scope: Scope = "global",
    count: Count = "official",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Write θ̂ = θt − λ·τH′ with τH = θH − θb trimmed to its top-k, from three safetensors folders, holding
    neither τH′ nor a whole shard (module docstring: three passes over θb and θH, one over θt).

    The tensors written equal, byte for byte, ``export_harm_removed(target, HarmVector.from_checkpoints(base,
    harmful, top_k=top_k, scope=scope, count=count), out_dir, lam)``, and so does the folder around them
    (shards, index, config dtype, tokenizer; the card adds the thresholds).

    Args:
        base: θb's folder (``model.safetensors`` or a sharded ``model.safetensors.index.json``).
        harmful: θH's folder: θb fine-tuned on harmful QA; same names, shapes and dtypes as θb.
        target: θt's folder: the model to edit (θb itself in the paper's BASE scenario); same names and shapes
            as θb (its dtype may differ: each weight is cast back to its own).
        out_dir: the folder to write; created; not one of the three, and holding no weights yet.
        lam: λ (paper default 3 with top-10 % HDR†; paper-notes.md §2.5).
        top_k: fraction of τH kept per group, in (0, 1]; None keeps every entry (the task vector, HDR‡), as
            does 1 with the official count.
        scope: the threshold's group: ``"global"`` (the paper's), ``"per_layer"`` or ``"per_tensor"``.
        count: ``"official"`` (⌊k·d⌋ + 1 and every tie) or ``"exact"`` (⌊k·d + ½⌋, ties by name, flat index).
        max_shard_size: output shard size, in bytes or as ``"5GB"`` / ``"2GiB"``.
        progress: tqdm bars over the parameters of each pass.

    Returns:
        ``out_dir``, loadable with ``AutoModelForCausalLM.from_pretrained`` / ``sa_lens.load_model``; its
        ``README.md`` records the three models (portable names), λ, top-k, scope, count, each group's threshold
        and entries kept, and the digest of τH′ (:func:`sa_lens.export.harm_vector_digest`).

    Raises:
        FileNotFoundError: a folder, or a shard named in an index, is missing.
        ValueError: pickle-only folders, corrupted shards, names/shapes/dtypes that differ between θb and θH,
            names or shapes of θt that differ from theirs, a non-finite τ entry, λ not finite, ``top_k``
            outside (0, 1], an unknown scope or count, ``out_dir`` equal to a source folder or holding weights,
            or an edit that overflows a weight's dtype (the files written so far are then left in ``out_dir``).
    """
    check_lam(lam)
    if top_k is not None:
        check_top_k(top_k)
    check_count(count)
    group_of = scope_grouping(scope)
    out = Path(out_dir)
    check_out_dir(out, [Path(base), Path(harmful), Path(target)])
    cb, ch, ct = Checkpoint(base), Checkpoint(harmful), Checkpoint(target)
    names = sorted(paired_names(cb, ch))  # name order: the exact count's tie order
    _check_target(ct, cb, names)
    groups = thresholds(cb, ch, names, group_of, top_k, count, progress)

    layout = checkpoint_layout(ct)
    digest = HarmDigest()
    bar = tqdm(total=sum(cb.specs[n].numel for n in names), desc="θt − λ·τH′", unit="param", unit_scale=True,
               disable=not progress)
    with ShardWriter(out, layout, max_shard_size) as writer:
        for name in sorted(layout):
            if name in cb.specs:
                writer.write(name, _edited_pieces(name, cb, ch, ct, groups[group_of(name)], lam, digest))
                digest.tensor_done(name, cb.specs[name].shape)
                bar.update(cb.specs[name].numel)
            else:  # an integer or bool buffer: copied as it is
                writer.write(name, [read_tensor(layout[name], name).reshape(-1)])
    bar.close()
    card = {
        "target": portable_name(target),
        "base": portable_name(base),
        "harmful": portable_name(harmful),
        "lam": float(lam),
        "top_k": None if top_k is None else float(top_k),
        "scope": scope,
        "count": count,
        "harm_vector_sha256": digest.hexdigest(),
        "edited_entries": sum(g.kept for g in groups.values()),
        "thresholds": {
            group: {"threshold": g.value, "entries": g.size, "kept": g.kept} for group, g in sorted(groups.items())
        },
    }
    finish_folder(Path(target), out, layout, card)
    return out


def thresholds(
    base: Checkpoint,
    harmful: Checkpoint,
    names: list[str],
    group_of,
    top_k: float | None,
    count: Count,
    progress: bool = False,
) -> dict[str, GroupThreshold]:
    """Each group's exact top-k threshold over τ = θH − θb, in two sweeps that hold no entries (passes 1 and 2
    of the module docstring).

    Args:
        base, harmful: the two checkpoints.
        names: the tensors of τ, in the exact count's tie order (sorted by name).
        group_of: a name's group (``sa_lens.harm_vector.scope_grouping(scope)``).
        top_k: fraction kept per group, or None for every entry.
        count: ``"official"`` or ``"exact"``.
        progress: tqdm bars.

    Returns:
        ``{group: GroupThreshold}``, ``kept`` still 0.

    Raises:
        ValueError: a τ entry that is NaN or inf.
    """
    groups: dict[str, GroupThreshold] = {}
    for name in names:
        groups.setdefault(group_of(name), GroupThreshold()).size += base.specs[name].numel
    for g in groups.values():
        g.rank = g.size + 1 if top_k is None else kept_rank(top_k, g.size, count)
    total = sum(base.specs[n].numel for n in names)
    # Sweep 1: the high-bit histograms (and the finiteness check, for every group, whatever it keeps).
    for name, _, piece in _pieces(base, harmful, names, "τH top-k: high bits", total, progress):
        groups[group_of(name)].hist += abs_bit_histogram(piece, name)
    selecting = {group: g for group, g in groups.items() if 0 < g.rank <= g.size}
    tops = {group: threshold_bin(g.hist, g.rank) for group, g in selecting.items()}
    # Sweep 2: the low bits of the threshold bin, over the groups that have a threshold.
    low = {group: torch.zeros(1 << 16, dtype=torch.int64) for group in selecting}
    members = [n for n in names if group_of(n) in selecting]
    for name, _, piece in _pieces(base, harmful, members, "τH top-k: low bits", sum(base.specs[n].numel for n in members), progress):
        group = group_of(name)
        low[group] += in_bin_histogram(piece, tops[group][0])
    for group, g in groups.items():
        if g.rank == 0:  # the exact count keeps nothing of this group
            g.bits, g.ties = _NOTHING, 0
        elif g.rank > g.size:  # every non-zero entry
            g.bits, g.ties = 0, 0
        else:
            top, rank_in_bin = tops[group]
            low_bits = low_bits_at_rank(low[group], rank_in_bin)
            assert low_bits is not None  # every entry of the bin was counted
            g.bits = (top << 16) | low_bits
            if count == "official":
                g.ties = None
            else:  # room left for ties once every entry above t is kept
                above = int(g.hist[top + 1 :].sum()) + int(low[group][low_bits + 1 :].sum())
                g.ties = g.rank - above
            if g.bits == 0:  # t = 0: the zeros it "keeps" change nothing and are never stored
                g.ties = 0
        g.hist = torch.zeros(0, dtype=torch.int64)  # done with it
    return groups


def _pieces(base: Checkpoint, harmful: Checkpoint, names: list[str], desc: str, total: int, progress: bool):
    bar = tqdm(total=total, desc=desc, unit="param", unit_scale=True, disable=not progress)
    for name, start, piece in stream_pieces(base, harmful, names):
        yield name, start, piece
        bar.update(piece.numel())
        del piece
    bar.close()


def _edited_pieces(
    name: str, base: Checkpoint, harmful: Checkpoint, target: Checkpoint, g: GroupThreshold, lam: float, digest: HarmDigest
) -> Iterator[Tensor]:
    """θt's tensor ``name``, edited, as flat pieces in order: the rows of each τ piece read from θt, the kept
    entries chosen by ``g`` (ties taken in flat order from ``g.ties``, shared by the group's tensors in name
    order) and subtracted as :func:`~sa_lens.harm_removal.apply_harm_removal` does."""
    shape = target.specs[name].shape
    row = math.prod(shape[1:]) if shape else 1
    for start, tau in ((s, t) for _, s, t in stream_pieces(base, harmful, [name])):
        if not tau.numel():
            continue
        if shape:
            rows = slice(start // row, start // row + tau.numel() // row)
            theta = target.read_rows(name, rows).reshape(-1)
        else:
            theta = target.read(name).reshape(-1)
        bits = abs_bits(tau)
        keep = bits > g.bits
        if g.ties is None:
            keep |= bits == g.bits
        elif g.ties > 0:
            tied = flat_where(bits == g.bits)[: g.ties]
            keep[tied] = True
            g.ties -= tied.numel()
        idx = flat_where(keep)
        del bits, keep
        if idx.numel():
            values = tau[idx]
            apply_harm_removal({name: theta}, HarmVector({name: SparseDelta((theta.numel(),), idx, values)}), lam)
            digest.add(idx + start, values)
            g.kept += idx.numel()
        del tau, idx
        yield theta


def _check_target(target: Checkpoint, base: Checkpoint, names: list[str]) -> None:
    """Refuse a θt whose floating-point tensors are not θb's, by name and shape (dtypes may differ)."""
    only_t, only_b = sorted(set(target.specs) - set(names)), sorted(set(names) - set(target.specs))
    if only_t or only_b:
        raise InputError(
            f"{target.path}: the target's parameters differ from the base's (only in target: {only_t[:3]}"
            f"{'…' if len(only_t) > 3 else ''}; only in base: {only_b[:3]}{'…' if len(only_b) > 3 else ''}). "
            "θb, θH and θt must share one architecture (and tie_word_embeddings setting)."
        )
    for name in names:
        if target.specs[name].shape != base.specs[name].shape:
            raise InputError(
                f"Parameter '{name}' has shape {target.specs[name].shape} in the target but {base.specs[name].shape} "
                "in the base; θb, θH and θt must share one architecture and vocabulary."
            )
