"""Where τH = θH − θb lives in weight space: mass per layer, per attention head (GQA aware) and per MLP.

A head's weights are slices of the checkpoint's projection matrices (HF layout ``[out, in]``):
``q_proj`` rows ``h·d_head … (h+1)·d_head``, ``o_proj`` columns of the same range, and ``k_proj`` /
``v_proj`` rows of its *key-value* head ``h // (n_heads / n_kv_heads)`` (grouped-query attention shares
one K/V head among a group of query heads). The head-wise alignment of ΔW_O with an activation-space
direction links the two spaces (anchors.md §4.4: no peer tool connects them).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from sa_lens.errors import InputError
from sa_lens.harm_vector import HarmVector

__all__ = ["head_mass", "layer_mass", "o_alignment", "rank_agreement"]

_ATTN = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight$")
_MLP = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _kept(hv: HarmVector, top_k: float) -> dict[str, Tensor]:
    """Boolean mask of the entries kept by a global top-k trim (the paper's HDR selection)."""
    return {name: t != 0 for name, t in hv.trim(top_k, scope="global").items()}


def _part(name: str) -> str:
    if _ATTN.search(name):
        return "attn"
    if _MLP.search(name):
        return "mlp"
    return "norm" if "norm" in name else "other"


def layer_mass(hv: HarmVector, top_k: float = 0.10) -> pd.DataFrame:
    """τH mass per layer and part (attention, MLP, norms); parameters outside layers get layer NA.

    Args:
        hv: the harm vector (untrimmed for mass; a trimmed one shows the mass HDR subtracts).
        top_k: fraction of the global top-k trim used for ``topk_share`` (paper: 0.10).

    Returns:
        One row per (layer, part): ``l2sq`` (Σ τ², weight units²), ``l1`` (Σ |τ|), ``numel``, ``l2sq_share``
        (of the whole vector), ``topk_share`` (share of all top-k entries that lie here) and ``topk_density``
        (share of this part's entries in the top-k).
    """
    kept = _kept(hv, top_k)
    total_l2 = sum(float(t.pow(2).sum()) for t in hv.deltas.values())
    total_kept = sum(int(m.sum()) for m in kept.values())
    acc: dict[tuple, list[float]] = {}
    for name, t in hv.items():
        m = _LAYER.search(name)
        key = (int(m.group(1)) if m else pd.NA, _part(name) if m else ("embed" if "embed" in name or "lm_head" in name else "norm"))
        a = acc.setdefault(key, [0.0, 0.0, 0, 0])
        a[0] += float(t.pow(2).sum())
        a[1] += float(t.abs().sum())
        a[2] += t.numel()
        a[3] += int(kept[name].sum())
    rows = [{"layer": layer, "part": part, "l2sq": l2, "l1": l1, "numel": n,
             "l2sq_share": l2 / total_l2 if total_l2 else 0.0, "topk_share": k / total_kept if total_kept else 0.0,
             "topk_density": k / n} for (layer, part), (l2, l1, n, k) in acc.items()]
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    return df.sort_values(["layer", "part"], na_position="first").reset_index(drop=True)


def head_mass(hv: HarmVector, n_heads: int, n_kv_heads: int | None = None, top_k: float = 0.10) -> pd.DataFrame:
    """τH mass per attention head and matrix (GQA aware), plus each head's total.

    Args:
        hv: the harm vector with Llama-style names (``model.layers.{l}.self_attn.{q,k,v,o}_proj.weight``).
        n_heads: query heads per layer (``model.cfg.n_heads``).
        n_kv_heads: key/value heads per layer (``model.cfg.n_key_value_heads``); default ``n_heads``.
        top_k: fraction of the global top-k trim for ``topk_share``.

    Returns:
        Rows ``layer, head, kv_head, matrix, l2sq, l1, topk_share, topk_density``; ``matrix`` is ``q``, ``k``,
        ``v``, ``o`` or ``total``. For ``k``/``v`` the values are those of the head's KV head (shared by its
        group); ``total`` = q + o + (k + v) / group size, so totals add up to the layer's attention mass.

    Raises:
        ValueError: no attention projections in ``hv``, or shapes that do not split into ``n_heads`` heads.
    """
    n_kv = n_kv_heads or n_heads
    if n_heads % n_kv:
        raise InputError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}.")
    group = n_heads // n_kv
    kept = _kept(hv, top_k)
    total_kept = max(1, sum(int(m.sum()) for m in kept.values()))
    mats: dict[int, dict[str, str]] = {}
    for name in hv:
        m = _ATTN.search(name)
        if m:
            mats.setdefault(int(m.group(1)), {})[m.group(2)] = name
    if not mats:
        raise InputError("No attention projections (…layers.{l}.self_attn.{q,k,v,o}_proj.weight) in the harm vector.")
    rows = []
    for layer, names in sorted(mats.items()):
        d_head = hv.deltas[names["o"]].shape[1] // n_heads
        if d_head * n_heads != hv.deltas[names["o"]].shape[1]:
            raise InputError(f"o_proj of layer {layer} has {hv.deltas[names['o']].shape[1]} inputs, not {n_heads} heads.")
        for head in range(n_heads):
            kv = head // group
            parts = {}
            for mat, index in (("q", head), ("k", kv), ("v", kv), ("o", head)):
                sl = slice(index * d_head, (index + 1) * d_head)
                t, mask = (hv.deltas[names[mat]], kept[names[mat]])
                t, mask = (t[:, sl], mask[:, sl]) if mat == "o" else (t[sl], mask[sl])
                parts[mat] = (float(t.pow(2).sum()), float(t.abs().sum()), int(mask.sum()), t.numel())
            for mat, (l2, l1, k, n) in parts.items():
                rows.append({"layer": layer, "head": head, "kv_head": kv, "matrix": mat, "l2sq": l2, "l1": l1,
                             "topk_share": k / total_kept, "topk_density": k / n})
            w = {"q": 1.0, "o": 1.0, "k": 1 / group, "v": 1 / group}
            tot = [sum(w[m] * parts[m][i] for m in parts) for i in range(4)]
            rows.append({"layer": layer, "head": head, "kv_head": kv, "matrix": "total", "l2sq": tot[0], "l1": tot[1],
                         "topk_share": tot[2] / total_kept, "topk_density": tot[2] / tot[3]})
    return pd.DataFrame(rows)


def o_alignment(
    hv: HarmVector,
    direction: Float[Tensor, "n_layers d_model"] | Float[Tensor, "d_model"],
    n_heads: int,
    mean_z: Float[Tensor, "n_layers n_heads d_head"] | None = None,
) -> pd.DataFrame:
    """How much of each head's ΔW_O writes along the activation-space direction of its layer.

    alignment = ‖v̂ᵀ ΔW_O,h‖ / ‖ΔW_O,h‖_F ∈ [0, 1], where ΔW_O,h = τH[o_proj][:, h·d_head:(h+1)·d_head] maps the
    head's d_head outputs into the residual stream: 1 when every output direction of the change lies along v̂;
    for a random change ≈ 1/√d_model (the ``baseline`` column). With ``mean_z`` (the head's mean ``hook_z``,
    e.g. on harmful prompts), ``delta_write`` = v̂ᵀ ΔW_O,h z̄_h is the signed change of what the head writes
    along v̂ for that input, in residual units (v̂ points harmful − harmless).

    Args:
        hv: the harm vector (Llama-style names).
        direction: ``[n_layers, d_model]`` (e.g. ``SafetyVector.directions``) or one ``[d_model]`` vector.
        n_heads: query heads per layer.
        mean_z: optional ``[n_layers, n_heads, d_head]`` mean head activations.

    Returns:
        Rows ``layer, head, alignment, baseline, delta_o_norm`` (and ``delta_write`` with ``mean_z``).

    Raises:
        ValueError: no ``o_proj`` entries, or a direction of the wrong width.
    """
    direction = torch.as_tensor(direction).float()
    rows = []
    for name, t in hv.items():
        m = _ATTN.search(name)
        if not m or m.group(2) != "o":
            continue
        layer = int(m.group(1))
        v = direction if direction.ndim == 1 else direction[layer]
        if v.shape[0] != t.shape[0]:
            raise InputError(f"direction has width {v.shape[0]} but o_proj writes {t.shape[0]} dimensions.")
        v = v / v.norm()
        d_head = t.shape[1] // n_heads
        for head in range(n_heads):
            block = t[:, head * d_head:(head + 1) * d_head]
            norm = float(block.norm())
            along = v @ block  # [d_head]: what each of the head's output coordinates now adds along v̂
            row = {"layer": layer, "head": head, "alignment": float(along.norm()) / norm if norm else 0.0,
                   "baseline": 1 / math.sqrt(t.shape[0]), "delta_o_norm": norm}
            if mean_z is not None:
                row["delta_write"] = float(along @ mean_z[layer, head].float())
            rows.append(row)
    if not rows:
        raise InputError("No o_proj entries (…layers.{l}.self_attn.o_proj.weight) in the harm vector.")
    return pd.DataFrame(rows).sort_values(["layer", "head"]).reset_index(drop=True)


def rank_agreement(a: pd.Series, b: pd.Series, n_permutations: int = 10_000, seed: int = 0,
                   groups: pd.Series | None = None) -> dict:
    """Spearman rank correlation between two rankings of the same units, with a permutation p-value.

    The two series are aligned on their index (e.g. ``(layer, head)``); units missing from either are dropped.
    With ``groups`` (e.g. each head's layer), units are ranked within their group and the permutations shuffle
    within groups, so the correlation ignores what differs between groups (a later layer being larger in
    both spaces) and asks only whether the rankings agree inside each group.

    Returns:
        ``{"rho": ρ, "n": units compared, "p_value": two-sided permutation p (``n_permutations`` shuffles)}``.

    Raises:
        ValueError: fewer than 3 common units.
    """
    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    n = len(joined)
    if n < 3:
        raise InputError(f"rank_agreement needs at least 3 common units; got {n}.")
    if groups is None:
        labels = np.zeros(n, dtype=int)
        ra, rb = joined["a"].rank().to_numpy(float), joined["b"].rank().to_numpy(float)
    else:
        g = groups.reindex(joined.index).to_numpy()
        labels = pd.factorize(g)[0]
        ra = joined["a"].groupby(g).rank().to_numpy(float)
        rb = joined["b"].groupby(g).rank().to_numpy(float)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    rho = float((ra * rb).sum() / denom) if denom else 0.0
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    null = np.empty(n_permutations)
    for i in range(n_permutations):
        shuffled = rb.copy()
        for idx in members:
            shuffled[idx] = rb[rng.permutation(idx)]
        null[i] = (shuffled @ ra) / denom if denom else 0.0
    p = float((np.sum(np.abs(null) >= abs(rho) - 1e-12) + 1) / (n_permutations + 1))
    return {"rho": rho, "n": n, "p_value": p}
