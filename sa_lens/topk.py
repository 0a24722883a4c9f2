"""Exact top-k magnitude trim over many tensors seen one at a time (HDR's global top-k; paper-notes.md §2.1, §7.5).

The official code concatenates the whole model and calls ``kthvalue`` (paper-notes.md §2.3): with d entries in
a group it takes t = the (d − ⌊k·d⌋)-th smallest |τ| and keeps |τ| ≥ t, ties included. We compute the same t
without holding the group, by a radix select over float32 bit patterns (non-negative floats sort like their
int32 patterns, and a finite |τ| has at most 31 significant bits):

1. Pass 1 counts the high 15 bits of every |τ| into a 32,768-bin histogram per group; the bin b holding the
   (d − ⌊k·d⌋)-th entry and the rank r inside it follow from the cumulative counts.
2. If bin b is small (at most as many entries as the largest tensor), the next pass keeps every entry whose
   high bits are ≥ b — the output plus bin b's candidates — and t is the r-th smallest candidate.
   Otherwise an extra pass counts the low 16 bits inside bin b, which gives t exactly, and the next pass
   keeps only |τ| ≥ t. Both routes give the same t, so the mask equals ``kthvalue``'s, ties and all.

Memory: the kept entries (12 bytes each as int64 index + fp32 value), one tensor in flight, one histogram
per group (256 KiB), and at most one largest-tensor's worth of candidates. Each pass asks ``tensors()`` for a
fresh iterator, so a streaming build re-reads the checkpoints instead of keeping τ.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int64
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["TrimmedEntry", "check_top_k", "trim_stream"]

_HIGH_BINS = 1 << 15  # |x| bit patterns of finite floats are < 0x7F800000, so bits >> 16 < 2**15
_LOW_BINS = 1 << 16
_CHUNK = 1 << 24  # entries per histogram step: bounds the int32 temporaries to 64 MB whatever the tensor


@dataclass
class TrimmedEntry:
    """The kept entries of one tensor: flat int64 ``indices`` (increasing) and their fp32 ``values``."""

    shape: tuple[int, ...]
    indices: Int64[Tensor, " kept"]
    values: Float[Tensor, " kept"]


@dataclass
class _Group:
    numel: int = 0
    high: Tensor | None = None  # [2**15] int64 counts of (|τ| bits >> 16)
    keep_all: bool = False
    bin: int = 0  # high bits of the threshold
    rank: int = 0  # 1-based rank of the threshold among the entries of `bin`
    floor: int = 0  # entries with |τ| bits ≥ floor are kept by the materialising pass
    exact: bool = False  # floor is the threshold itself (no candidate refinement needed)


def check_top_k(top_k: float) -> None:
    """Raise ValueError unless ``top_k`` is a real number in (0, 1]."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Real) or not 0.0 < top_k <= 1.0:
        raise ValueError(f"top_k must be a fraction in (0, 1] (0.1 keeps the top 10 %); got {top_k!r}.")


def _abs_bits(t: Tensor) -> Tensor:
    return t.abs().view(torch.int32).reshape(-1)


def _chunks(flat: Tensor) -> Iterator[Tensor]:
    for start in range(0, flat.numel(), _CHUNK):
        yield flat[start : start + _CHUNK]


def _progress(names: list[str], numel: dict[str, int], desc: str, enabled: bool) -> tqdm:
    return tqdm(total=sum(numel[n] for n in names), desc=desc, unit="param", unit_scale=True, disable=not enabled)


def trim_stream(
    tensors: Callable[[], Iterable[tuple[str, Float[Tensor, "..."]]]],
    names: list[str],
    numel: dict[str, int],
    group_of: Callable[[str], str],
    top_k: float,
    progress: bool = False,
    candidate_budget: int | None = None,
) -> dict[str, TrimmedEntry]:
    """Keep, per group, the entries with |τ| ≥ the official ``kthvalue`` threshold; see the module docstring.

    Args:
        tensors: called once per pass; each call yields ``(name, τ)`` for every name, float32, in any order.
        names: the names the passes will yield.
        numel: entries per name (for progress and group sizes).
        group_of: the threshold group of a name (one group = global top-k).
        top_k: fraction kept per group, in (0, 1].
        progress: show a tqdm bar per pass.
        candidate_budget: most threshold-bin entries held for the two-pass route (default: the largest
            tensor's size); above it the exact three-pass route runs. Both give the same result.

    Returns:
        ``{name: TrimmedEntry}`` for every name.

    Raises:
        ValueError: ``top_k`` outside (0, 1] or a τ entry that is NaN or inf.
    """
    check_top_k(top_k)
    groups: dict[str, _Group] = {}
    for n in names:
        groups.setdefault(group_of(n), _Group()).numel += numel[n]
    if candidate_budget is None:
        candidate_budget = max(numel.values(), default=0)

    bar = _progress(names, numel, "τH top-k pass 1: histogram", progress)
    for name, t in tensors():
        if not torch.isfinite(t).all():
            raise ValueError(
                f"Harm vector entry '{name}' holds NaN or inf. Check both checkpoints for non-finite weights "
                "(e.g. a diverged fine-tune) before building τH."
            )
        g = groups[group_of(name)]
        if g.high is None:
            g.high = torch.zeros(_HIGH_BINS, dtype=torch.int64)
        for chunk in _chunks(_abs_bits(t)):
            g.high += torch.bincount(chunk >> 16, minlength=_HIGH_BINS)
        bar.update(t.numel())
    bar.close()

    for g in groups.values():
        m = g.numel - int(top_k * g.numel)  # 1-based rank of the threshold, as in the official code
        if m == 0:
            g.keep_all = True
            continue
        cum = g.high.cumsum(0)
        g.bin = int(torch.searchsorted(cum, m))
        g.rank = m - (int(cum[g.bin - 1]) if g.bin else 0)
        g.floor = g.bin << 16
    candidates = sum(int(g.high[g.bin]) for g in groups.values() if not g.keep_all)
    if candidates > candidate_budget:
        _exact_floors(tensors, names, numel, groups, group_of, progress)

    kept: dict[str, TrimmedEntry] = {}
    bar = _progress(names, numel, "τH top-k pass 2: keep", progress)
    for name, t in tensors():
        g = groups[group_of(name)]
        flat = t.reshape(-1)
        idx = torch.nonzero(_abs_bits(flat) >= g.floor).squeeze(1) if not g.keep_all else torch.arange(flat.numel())
        kept[name] = TrimmedEntry(tuple(t.shape), idx, flat[idx])
        bar.update(t.numel())
    bar.close()

    for key, g in groups.items():
        if g.keep_all or g.exact:
            continue
        members = [kept[n] for n in names if group_of(n) == key]
        in_bin = torch.cat([b[(b >> 16) == g.bin] for b in (_abs_bits(e.values) for e in members)])
        threshold = int(in_bin.kthvalue(g.rank).values)
        for e in members:
            sel = _abs_bits(e.values) >= threshold
            e.indices, e.values = e.indices[sel], e.values[sel]
    return kept


def _exact_floors(tensors, names, numel, groups: dict[str, _Group], group_of, progress: bool) -> None:
    """Extra pass when the threshold bin is crowded (many ties): count low bits inside it to get t exactly."""
    low = {k: torch.zeros(_LOW_BINS, dtype=torch.int64) for k, g in groups.items() if not g.keep_all}
    bar = _progress(names, numel, "τH top-k pass 1b: threshold", progress)
    for name, t in tensors():
        key = group_of(name)
        if key in low:
            for chunk in _chunks(_abs_bits(t)):
                low[key] += torch.bincount(chunk[(chunk >> 16) == groups[key].bin] & 0xFFFF, minlength=_LOW_BINS)
        bar.update(t.numel())
    bar.close()
    for key, counts in low.items():
        g = groups[key]
        g.floor = (g.bin << 16) | int(torch.searchsorted(counts.cumsum(0), g.rank))
        g.exact = True
