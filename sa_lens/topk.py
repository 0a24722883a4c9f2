"""Exact top-k magnitude trim over many tensors seen once each (HDR's global top-k; paper-notes.md §2.1, §7.5).

**What is kept** — the one statement of top-k semantics; ``HarmVector.trim``, ``HarmVector.from_checkpoints``
and :func:`trim_stream` refer here. A *group* is what the threshold is computed over: the whole vector
(``scope="global"``), one decoder layer (parameters outside the layers form one more group), or one tensor.
With d entries in a group and a fraction k = ``top_k`` in (0, 1]:

- ``count="official"`` (the default; the official code's ``topk_values_mask`` in ``HDR/Ties_Merge.py``, read
  in paper-notes.md §2.3): t = ``kthvalue(|τ|, d − ⌊k·d⌋)``, the K-th largest |τ| with K = ⌊k·d⌋ + 1, and
  every entry with |τ| ≥ t is kept, ties at t included. Without ties that is ⌊k·d⌋ + 1 entries (1,000
  entries at k = 0.05 keep 51; k = 1 keeps all d); with ties, more (all d when every |τ| is equal).
- ``count="exact"``: exactly n = ⌊k·d + ½⌋ entries (k·d rounded half up; 1,000 at 0.05 keep 50): every entry
  with |τ| above the n-th largest, then, of the entries tied with it, those first in the group's order —
  tensors sorted by name (Python string order), lower flat index first within a tensor. The result does not
  depend on the order tensors or pieces arrive in.

In both, an entry whose τ is exactly 0 is never stored (keeping a zero changes nothing), so a group with fewer
non-zeros than the count keeps just its non-zeros.

The official threshold t is found in **one pass** over the tensors, holding only about the kept entries:

- Non-negative float32 values sort like their int32 bit patterns, so a 32,768-bin histogram of the high
  15 bits of |τ| (a finite |τ| has 31 significant bits) locates the bin of any order statistic.
- The K-th largest of the entries seen so far can only rise as more arrive, so its bin, read off the running
  histogram, is a floor under the final threshold: entries below it are never kept. Each tensor is added to
  the histogram, then its entries at or above the floor are held as (flat int64 index, fp32 value).
- When the held entries exceed K + ``slack`` (once ties at the threshold hold more: that many + slack),
  they are pruned to the current floor, tensors cut longest ago first, until K + slack/2 remain (and, if a
  bin crowded with ties keeps more above it, to the exact K-th largest seen, from a low-16-bit histogram of
  the held entries in that bin). At the end the same exact step gives t; the held entries ≥ t are the result.

Every entry in the threshold's bin that could be kept is still held, and the low-bit histogram is read from
the top, so t equals ``kthvalue``'s, ties and all (tests: hypothesis against ``kthvalue`` with many ties).

A caller that can read τ again needs no held entries at all (:mod:`sa_lens.streamed_export`): one sweep adds
every piece to its group's :func:`abs_bit_histogram`, :func:`threshold_bin` names the threshold's bin, a second
sweep counts that bin's low 16 bits (:func:`in_bin_histogram`) and :func:`low_bits_at_rank` gives t — the same
two digits, over every entry rather than the held ones.

Tensors arrive as *pieces* (a flat fp32 slice and its offset), so a caller reading checkpoints can hold a
few million entries of a tensor pair at a time rather than the whole pair: the running floor works per piece
as it does per tensor, and the pieces of a tensor are joined only at the end.

Memory: the held entries, at most (K + T + slack + C) × 12 bytes with T the entries tied at the running
threshold and C = 2**22 the insertion chunk; the piece in flight (its fp32 τ and the caller's reads) and 64 MB
of chunked temporaries; a 256 KiB histogram per group; while joining, the kept entries of one tensor twice.
With slack = L/4 for the largest tensor size L that is about 12·(K + T) + 3·L + 100 MB plus the pieces: the
kept entries plus well under 3 × the largest fp32 tensor pair (24·L bytes). Time: one read of each tensor, plus
pruning, which touches each held entry about once per slack/2 insertions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch
from jaxtyping import Float, Int32, Int64
from torch import Tensor
from tqdm.auto import tqdm

from sa_lens.errors import InputError
from sa_lens.memory import release_freed_memory
from sa_lens.validation import is_finite_real

__all__ = [
    "COUNTS",
    "Count",
    "TrimmedEntry",
    "abs_bit_histogram",
    "abs_bits",
    "check_count",
    "check_top_k",
    "flat_where",
    "in_bin_histogram",
    "kept_rank",
    "low_bits_at_rank",
    "threshold_bin",
    "trim_stream",
    "whole_tensors",
]

Count = Literal["official", "exact"]
COUNTS: tuple[str, ...] = get_args(Count)

_HIGH_BINS = 1 << 15  # |x| bit patterns of finite floats are < 0x7F800000, so bits >> 16 < 2**15
_LOW_BINS = 1 << 16
_NON_FINITE_BIN = 0x7F80  # bits >> 16 of +inf; NaN patterns lie above it
_CHUNK = 1 << 24  # entries per histogram step: bounds the int32 temporaries to 64 MB whatever the tensor
_INSERT_CHUNK = 1 << 22  # entries per insertion step: at most 48 MB of (index, value) beyond the prune limit


@dataclass
class TrimmedEntry:
    """The kept entries of one tensor: flat int64 ``indices`` (increasing) and their fp32 ``values``.

    Only non-zero entries are listed: where the threshold is 0, the zeros it "keeps" are left out."""

    shape: tuple[int, ...]
    indices: Int64[Tensor, " kept"]
    values: Float[Tensor, " kept"]


@dataclass
class _Piece:
    """Held entries of one piece of a tensor: indices are flat positions in the whole tensor."""

    name: str
    start: int
    indices: Int64[Tensor, " held"]
    values: Float[Tensor, " held"]


Pieces = Iterable[tuple[str, int, Float[Tensor, " piece"]]]


def whole_tensors(items: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, int, Float[Tensor, " numel"]]]:
    """``(name, τ)`` pairs as one piece each: ``(name, 0, τ.reshape(-1))``."""
    for name, t in items:
        yield name, 0, t.reshape(-1)


@dataclass
class _Group:
    rank: int  # the threshold is the rank-th largest |τ| of the group; > size: keep everything; 0: nothing
    size: int
    hist: Tensor = field(default_factory=lambda: torch.zeros(_HIGH_BINS, dtype=torch.int64))
    seen: int = 0
    floor: int = 0  # |τ| bit pattern under which nothing can be kept
    members: list[tuple[str, int]] = field(default_factory=list)  # held pieces, (name, start)
    held: int = 0
    limit: int = 0  # prune when more than this many entries are held
    cut: dict[tuple[str, int], int] = field(default_factory=dict)  # floor each held piece was last cut at

    @property
    def keep_all(self) -> bool:
        return self.rank > self.size


def check_top_k(top_k: float) -> None:
    """Raise ValueError unless ``top_k`` is a real number in (0, 1]."""
    if not is_finite_real(top_k) or not 0.0 < top_k <= 1.0:
        raise InputError(f"top_k must be a fraction in (0, 1] (0.1 keeps the top 10 %); got {top_k!r}.")


def check_count(count: str) -> None:
    """Raise ValueError unless ``count`` is one of :data:`COUNTS` (see the module docstring)."""
    if count not in COUNTS:
        raise InputError(f"count must be one of {', '.join(map(repr, COUNTS))}; got {count!r}.")


def kept_rank(top_k: float, size: int, count: Count = "official") -> int:
    """The rank (from the largest) of the threshold |τ| in a group of ``size`` entries: ⌊k·d⌋ + 1 for the
    official count, ⌊k·d + ½⌋ for the exact one (module docstring). Above ``size``: everything is kept."""
    return int(top_k * size) + 1 if count == "official" else math.floor(top_k * size + 0.5)


def abs_bits(t: Float[Tensor, "..."]) -> Int32[Tensor, "..."]:
    """Bit patterns of |t|: the float32 bits with the sign bit cleared (5× faster than ``t.abs()`` on CPU).

    Non-negative float32 values sort like these int32 patterns, so the radix select below works on them."""
    return torch.bitwise_and(t.view(torch.int32), 0x7FFFFFFF)


def _chunks(flat: Tensor) -> Iterator[Tensor]:
    for start in range(0, flat.numel(), _CHUNK):
        yield flat[start : start + _CHUNK]


def flat_where(mask: Tensor) -> Int64[Tensor, " n"]:
    """Flat int64 positions of the True entries: numpy's flatnonzero, ~3× faster than torch.nonzero on CPU."""
    return torch.from_numpy(np.flatnonzero(mask.numpy())).to(torch.int64)


def abs_bit_histogram(flat: Float[Tensor, " n"], name: str) -> Int64[Tensor, " 32768"]:
    """The radix select's first digit: counts of the high 15 bits of |τ|'s float32 bit patterns (bin b holds
    the entries with :func:`abs_bits` in [b·2**16, (b+1)·2**16)), chunked so temporaries stay near 64 MB.

    Raises:
        ValueError: an entry is NaN or inf (the message names ``name``, the tensor it came from).
    """
    hist = torch.zeros(_HIGH_BINS, dtype=torch.int64)
    for chunk in _chunks(flat):  # |τ| bits per chunk, twice, rather than 4 bytes per entry of the piece
        hist += torch.bincount(abs_bits(chunk) >> 16, minlength=_HIGH_BINS)
    if hist[_NON_FINITE_BIN:].any():
        raise InputError(
            f"Harm vector entry '{name}' holds NaN or inf. Check both checkpoints for non-finite weights "
            "(e.g. a diverged fine-tune) before building τH."
        )
    return hist


def threshold_bin(hist: Int64[Tensor, " 32768"], rank: int) -> tuple[int, int]:
    """The bin holding the rank-th largest entry, and that entry's rank from the top inside the bin."""
    from_top = hist.flip(0).cumsum(0)  # from_top[j] = entries in bins ≥ 2**15 − 1 − j
    j = int(torch.searchsorted(from_top, rank))
    return _HIGH_BINS - 1 - j, rank - (int(from_top[j - 1]) if j else 0)


def in_bin_histogram(values: Float[Tensor, " n"], top: int) -> Int64[Tensor, " 65536"]:
    """The radix select's second digit: counts of the low 16 bits of the |values| in bin ``top`` (the others
    left out), chunked."""
    low = torch.zeros(_LOW_BINS, dtype=torch.int64)
    for chunk in _chunks(values):
        # Low 16 bits of in-bin entries as 1..2**16; entries below the bin land in 0, above in 2**16 + 1
        # (cheaper than a boolean selection, which costs a nonzero pass and a copy on CPU).
        x = (abs_bits(chunk) - (top << 16)).clamp_(-1, _LOW_BINS).add_(1)
        low += torch.bincount(x, minlength=_LOW_BINS + 2)[1:-1]
    return low


def low_bits_at_rank(low: Int64[Tensor, " 65536"], rank_in_bin: int) -> int | None:
    """The low 16 bits of the rank_in_bin-th largest entry counted in ``low`` (read from the top), or None when
    ``low`` counts fewer entries than that."""
    j = int(torch.searchsorted(low.flip(0).cumsum(0), rank_in_bin))
    return _LOW_BINS - 1 - j if j < _LOW_BINS else None


def trim_stream(
    pieces: Callable[[], Pieces],
    shapes: dict[str, tuple[int, ...]],
    group_of: Callable[[str], str],
    top_k: float,
    progress: bool = False,
    slack: int | None = None,
    count: Count = "official",
) -> dict[str, TrimmedEntry]:
    """Keep, per group, the top-k entries by |τ| as the module docstring states (``count`` picks which rule).

    Args:
        pieces: called once; yields ``(name, start, τ_piece)``: float32 flat slices covering every entry of
            every name exactly once (``start`` = the slice's flat offset in its tensor), in any order.
            :func:`whole_tensors` turns ``(name, τ)`` pairs into one piece each.
        shapes: the shape of every name it will yield (group sizes are known before the pass, so K is too).
        group_of: the threshold group of a name (one group = global top-k).
        top_k: fraction kept per group, in (0, 1].
        progress: show a tqdm bar.
        slack: extra entries held before pruning (default: a quarter of the largest tensor); smaller
            prunes more often, never changes the result.
        count: ``"official"`` (⌊k·d⌋ + 1 and every tie) or ``"exact"`` (⌊k·d + ½⌋, ties broken by name, then
            flat index).

    Returns:
        ``{name: TrimmedEntry}`` for every name of ``shapes``.

    Raises:
        ValueError: ``top_k`` outside (0, 1], an unknown ``count`` or a τ entry that is NaN or inf.
    """
    check_top_k(top_k)
    check_count(count)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    if slack is None:
        slack = max(numel.values(), default=0) // 4
    groups: dict[str, _Group] = {}
    for n in shapes:
        groups.setdefault(group_of(n), _Group(0, 0)).size += numel[n]
    for g in groups.values():
        g.rank = kept_rank(top_k, g.size, count)
        g.limit = g.rank + slack

    held: dict[tuple[str, int], _Piece] = {}
    bar = tqdm(total=sum(numel.values()), desc="τH top-k", unit="param", unit_scale=True, disable=not progress)
    for name, start, flat in pieces():
        if not flat.numel():
            # Nothing to hold, and its key may repeat (rows of a (n, 0) tensor all start at 0): a second
            # member under one key would end _prune's cut-order walk before the pieces cut after it.
            continue
        g = groups[group_of(name)]
        hist = abs_bit_histogram(flat, name)
        bar.update(flat.numel())
        if g.rank == 0:  # the exact count keeps nothing of this group
            continue
        g.hist += hist
        g.seen += flat.numel()
        if not g.keep_all and g.seen >= g.rank:
            g.floor = max(g.floor, threshold_bin(g.hist, g.rank)[0] << 16)
        floor_before = g.floor  # every entry inserted below is at or above it
        key = (name, start)
        held[key] = _insert(g, held, _Piece(name, start, *_empty()), flat, hist, slack)
        g.members.append(key)
        g.cut[key] = floor_before
        # Before the iterator reads the next piece, not after: one piece in memory, not two. (Freed pages are
        # not trimmed here: re-faulting them for every piece cost 20 % more wall time; prunes and the end trim.)
        del flat
    bar.close()
    for g in groups.values():
        if not g.keep_all and g.rank:
            _prune(g, held, exact=True)
            if count == "exact":
                _break_ties(g, held)
    return _join(held, shapes)


def _break_ties(g: _Group, held: dict[tuple[str, int], _Piece]) -> None:
    """Exact count: of the held entries tied at the threshold (``g.floor``, exact after the last prune), keep
    only as many as the rank leaves room for, first by name, then by flat index (module docstring)."""
    keys = sorted(k for k in dict.fromkeys(g.members) if k in held)  # (name, start): name, then offset order
    room = g.rank - sum(int((abs_bits(held[k].values) > g.floor).sum()) for k in keys)
    for k in keys:
        e = held[k]
        tied = flat_where(abs_bits(e.values) == g.floor)
        if tied.numel() > room:
            keep = torch.ones(e.values.numel(), dtype=torch.bool)
            keep[tied[room:]] = False
            e.indices, e.values = e.indices[keep], e.values[keep]
        room = max(room - tied.numel(), 0)


def _empty() -> tuple[Tensor, Tensor]:
    return torch.empty(0, dtype=torch.int64), torch.empty(0)


def _join(held: dict[tuple[str, int], _Piece], shapes: dict[str, tuple[int, ...]]) -> dict[str, TrimmedEntry]:
    """One TrimmedEntry per name from its pieces, in offset order; each name's pieces are freed as it is joined
    (so joining costs the kept entries of one tensor twice, not of the model)."""
    by_name: dict[str, list[tuple[str, int]]] = {n: [] for n in shapes}
    for key in held:
        by_name[key[0]].append(key)
    out = {}
    for name, keys in by_name.items():
        parts = [held.pop(k) for k in sorted(keys, key=lambda k: k[1])]
        if len(parts) == 1:
            indices, values = parts[0].indices, parts[0].values
        elif parts:
            indices, values = torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts])
        else:  # an empty tensor yields no piece
            indices, values = _empty()
        out[name] = TrimmedEntry(tuple(shapes[name]), indices, values)
        del parts
    release_freed_memory()
    return out


def _insert(
    g: _Group, held: dict[tuple[str, int], _Piece], piece: _Piece, flat: Tensor, hist: Tensor, slack: int
) -> _Piece:
    """Hold the entries of one piece at or above the group's floor, pruning the held others between chunks.

    The buffers are sized once from the piece's histogram (its entries in bins at or above the floor's), so
    a large piece costs its kept entries once, not again in growing copies. The piece is not in ``held``
    until it is complete, so the prunes it triggers leave it alone; an exact floor computed without its
    in-bin entries is lower than the true one, so still a valid floor.
    """
    upper = int(hist[g.floor >> 16 :].sum())
    if g.floor < _LOW_BINS:  # the floor's bin holds the zeros, which are never held: do not size for them
        upper -= sum(int((chunk == 0).sum()) for chunk in _chunks(flat))
    indices, values, filled = torch.empty(upper, dtype=torch.int64), torch.empty(upper), 0
    for start in range(0, flat.numel(), _INSERT_CHUNK):
        # max(floor, 1): a zero entry is never held, even when the threshold is 0 (more than K entries of τ
        # are exactly 0, as after a fine-tune that left some tensors untouched, or when re-trimming a
        # sparse vector). Keeping it would change nothing but hold — and, via compact(), densify — them all.
        idx = flat_where(abs_bits(flat[start : start + _INSERT_CHUNK]) >= max(g.floor, 1)).add_(start)
        torch.index_select(flat, 0, idx, out=values[filled : filled + idx.numel()])
        indices[filled : filled + idx.numel()] = idx.add_(piece.start)
        filled += idx.numel()
        g.held += idx.numel()
        if not g.keep_all and g.held > g.limit:
            _prune(g, held, exact=False, slack=slack)
            if g.held > g.rank + slack:  # the floor's bin is crowded with ties: cut at the exact value
                _prune(g, held, exact=True)
            # Entries tied at the exact value cannot be dropped yet (bf16 checkpoints tie a lot): wait
            # for another slack of insertions rather than re-prune after every chunk.
            g.limit = max(g.rank, g.held) + slack
    if filled < 0.9 * upper:  # the floor rose mid-piece: give the unused part of the buffers back
        piece.indices, piece.values = indices[:filled].clone(), values[:filled].clone()
    else:
        piece.indices, piece.values = indices[:filled], values[:filled]
    return piece


def _prune(g: _Group, held: dict[tuple[str, int], _Piece], exact: bool, slack: int = 0) -> None:
    """Drop held entries under the K-th largest seen so far: its bin (stopping once K + slack/2 are held),
    or (exact) its value, in every piece."""
    top, rank_in_bin = threshold_bin(g.hist, g.rank)
    floor = top << 16
    keys = [k for k in g.members if k in held]
    if exact:
        low = sum((in_bin_histogram(held[k].values, top) for k in keys), torch.zeros(_LOW_BINS, dtype=torch.int64))
        # Read from the top: in-bin entries under an earlier exact floor were dropped, but they lie below
        # the threshold, so the rank_in_bin-th largest of those still held is the true one.
        bits = low_bits_at_rank(low, rank_in_bin)
        if bits is not None:  # else fewer held in the bin than its rank (the piece being inserted holds them)
            floor |= bits
    g.floor = max(g.floor, floor)
    # Pieces cut longest ago (lowest floor) first: they hold the most that the new floor drops. A partial
    # prune stops once half the slack is free, so the next one is slack/2 insertions away (amortised cost).
    for k in sorted(keys, key=g.cut.__getitem__):
        if g.cut[k] >= g.floor:  # already cut at this floor or above
            break
        if not exact and g.held <= g.rank + slack // 2:
            break
        # Bit patterns are recomputed per piece rather than kept from above: 4 bytes per held entry.
        e = held[k]
        keep = flat_where(abs_bits(e.values) >= g.floor)
        g.held -= e.indices.numel() - keep.numel()
        e.indices, e.values = e.indices.index_select(0, keep), e.values.index_select(0, keep)
        g.cut[k] = g.floor
    release_freed_memory()
