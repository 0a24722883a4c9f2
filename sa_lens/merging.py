"""Combining and sparsifying harm vectors: TIES (trim → elect sign → disjoint mean) and DARE (drop and rescale).

The paper's HDR† is "TIES" with a single task vector, where sign election and the disjoint mean are no-ops
and only the trim acts (paper-notes.md §2.3). With several harm vectors — θH fine-tuned on different harm
categories, or several seeds — TIES proper applies (Yadav et al. 2023, "TIES-Merging", Alg. 1); DARE
(Yu et al. 2024, "Language Models are Super Mario", Eq. 1) is the sparsifier RESTA uses (anchors.md §2).
Both work tensor by tensor, so they hold one parameter's worth of dense data per input at a time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from sa_lens.errors import InputError
from sa_lens.harm_vector import HarmVector, Scope
from sa_lens.sparse_delta import SparseDelta, compact
from sa_lens.validation import is_finite_real

__all__ = ["dare", "ties_merge"]


def _like_inputs(result: Float[Tensor, "..."], inputs: Sequence[HarmVector], name: str) -> Tensor | SparseDelta:
    """Dense when every input held ``name`` dense (in-memory work), else the compact form (streamed work)."""
    if all(not isinstance(v.deltas[name], SparseDelta) for v in inputs):
        return result
    sparse = SparseDelta.from_dense(result)
    return compact(sparse.indices, sparse.values, sparse.shape)


def ties_merge(vectors: Sequence[HarmVector], top_k: float | None = 0.2, scope: Scope = "global") -> HarmVector:
    """Merge several harm vectors with TIES: trim each, elect a sign per entry, average the agreeing entries.

    Per entry j, with τ̂ᵢ the trimmed vectors: γⱼ = sign(Σᵢ τ̂ᵢⱼ) (the sign with the larger total mass);
    where that sum is exactly 0, γⱼ = the sign of Σⱼ γⱼ over the whole model (the official TIES code's
    "majority" rule); then τⱼ = mean of τ̂ᵢⱼ over the i with τ̂ᵢⱼ ≠ 0 and sign(τ̂ᵢⱼ) = γⱼ, 0 if none.
    With one vector this returns its trim unchanged (the paper's HDR†).

    Args:
        vectors: harm vectors over the same parameter names and shapes.
        top_k: fraction each vector keeps before the vote, in (0, 1] (TIES uses 0.2; the paper's HDR
            uses 0.1); None merges the vectors as given.
        scope: where each trim's threshold is computed (see :meth:`HarmVector.trim`).

    Returns:
        The merged harm vector, fp32; apply it with ``harm_removal(model, merged, lam)``.

    Raises:
        ValueError: no vectors, vectors over different names or shapes, or a bad ``top_k``/``scope``.
    """
    if not vectors:
        raise InputError("ties_merge needs at least one harm vector.")
    names = list(vectors[0].deltas)
    for v in vectors[1:]:
        if set(v.deltas) != set(names) or any(tuple(v.deltas[n].shape) != tuple(vectors[0].deltas[n].shape) for n in names):
            raise InputError("ties_merge needs harm vectors over the same parameter names and shapes (one architecture).")
    trimmed = [v.trim(top_k, scope) if top_k is not None else v for v in vectors]

    def elected(name: str) -> tuple[Tensor, Tensor]:
        stack = torch.stack([v.dense(name) for v in trimmed])  # [n_vectors, *shape]
        return stack, torch.sign(stack.sum(0))

    majority = torch.sign(sum(elected(n)[1].sum() for n in names))  # first pass: the model-wide sign
    merged = {}
    for name in names:
        stack, sign = elected(name)
        sign = torch.where(sign == 0, majority, sign)
        agree = torch.where(sign > 0, stack > 0, stack < 0)
        total = (stack * agree).sum(0)
        merged[name] = _like_inputs(total / agree.sum(0).clamp(min=1), trimmed, name)
    meta = {
        "base": [v.meta.get("base") for v in vectors],
        "harmful": [v.meta.get("harmful") for v in vectors],
        "top_k": top_k,
        "scope": scope if top_k is not None else None,
        "merge": "ties",
    }
    return HarmVector(merged, meta)


def _seed_for(seed: int, name: str) -> int:
    """A per-parameter seed: the drop mask of a tensor depends on (seed, name) only, not on tensor order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def dare(hv: HarmVector, p: float, seed: int = 0) -> HarmVector:
    """DARE: drop each entry of τH with probability ``p`` and rescale the survivors by 1/(1 − p).

    The rescale keeps E[τ′] = τ, so λ keeps its meaning. Deterministic: entry j of parameter ``name``
    is dropped iff ``u[j] < p`` for u = ``torch.rand(numel)`` from a generator seeded by (``seed``,
    ``name``), so dense and sparse forms of one vector give the same result, in any tensor order.

    Args:
        hv: the harm vector (trimmed or not).
        p: drop probability, in [0, 1).
        seed: the random seed.

    Returns:
        The sparsified vector, fp32; dense entries stay dense, sparse ones sparse.

    Raises:
        ValueError: ``p`` not in [0, 1).
    """
    if not is_finite_real(p) or not 0.0 <= p < 1.0:
        raise InputError(f"DARE's drop probability p must be in [0, 1); got {p!r}.")
    out = {}
    for name, t in hv.deltas.items():
        numel = t.numel if isinstance(t, SparseDelta) else t.numel()
        u = torch.rand(numel, generator=torch.Generator().manual_seed(_seed_for(seed, name)))
        if isinstance(t, SparseDelta):
            keep = u[t.indices] >= p
            out[name] = SparseDelta(t.shape, t.indices[keep], t.values[keep] / (1.0 - p))
        else:
            out[name] = torch.where(u.view(t.shape) >= p, t / (1.0 - p), torch.zeros((), dtype=t.dtype))
    return HarmVector(out, {**hv.meta, "dare_p": float(p), "dare_seed": seed})
