"""Where τH = θH − θb lives in weight space: mass per layer and kind, per attention head (GQA aware).

A head's weights are slices of the checkpoint's projection matrices (HF layout ``[out, in]``):
``q_proj`` rows ``h·d_head … (h+1)·d_head``, ``o_proj`` columns of the same range, and ``k_proj`` /
``v_proj`` rows of its *key-value* head ``h // (n_heads / n_kv_heads)`` (grouped-query attention shares
one K/V head among a group of query heads). Fused matrices that stack q, k and v as contiguous blocks are
sliced first: Phi-3's ``qkv_proj`` (``[out, in]``, rows q | k | v) and GPT-2's ``Conv1D`` ``c_attn``
(``[in, out]``, columns q | k | v), whose ``c_proj`` is ``[in, out]`` too (a head's inputs are rows). The head-wise alignment of ΔW_O with an activation-space
direction links the two spaces (anchors.md §4.4: no peer tool connects them).

Layers, kinds and projections are read from parameter names by :mod:`sa_lens.parameter_names`. Every form
of harm vector is read one tensor at a time through :meth:`HarmVector.sparse` / :meth:`HarmVector.dense`
(dense, trimmed, streamed from checkpoints, loaded sparse), never densifying more than one tensor, and the
same vector in any form gives the same numbers: a tensor's sums run over its non-zero entries in row-major
order in float64, and sums over tensors are exactly rounded (``math.fsum``), whatever their order.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int64
from torch import Tensor

from sa_lens.defaults import DEFAULT_TOP_K
from sa_lens.errors import InputError
from sa_lens.harm_vector import HarmVector
from sa_lens.parameter_names import attention_projection, layer_index, parameter_kind
from sa_lens.topk import trim_stream, whole_tensors

__all__ = ["head_mass", "layer_mass", "o_alignment", "rank_agreement"]

# (parameter name, axis whose index picks the head: 0 rows / 1 columns, first index, end index) of one matrix.
Slice = tuple[str, int, int, int]
_QKV_ROWS = re.compile(r"\.self_attn\.qkv_proj\.weight$")  # Phi-3: [(H + 2·kv)·d_head, d_model]
_QKV_COLUMNS = re.compile(r"\.attn\.c_attn\.weight$")  # GPT-2 Conv1D: [d_model, 3·d_model]
_CONV1D_O = re.compile(r"\.attn\.c_proj\.weight$")  # GPT-2 Conv1D: [d_model (heads' inputs), d_model]
# GPT-NeoX-style fused q/k/v, interleaved per head ([H, 3, d_head] rows): no contiguous q, k or v block.
_INTERLEAVED = re.compile(r"\.query_key_value\.weight$")


def _kept(hv: HarmVector, top_k: float) -> dict[str, Int64[Tensor, " kept"]]:
    """Flat positions of the entries a global top-k trim keeps (the paper's HDR selection, as ``hv.trim``).

    Read one dense tensor at a time, so a dense vector is not copied whole as ``hv.trim`` would return it.
    """
    shapes = {name: tuple(hv.deltas[name].shape) for name in hv}
    kept = trim_stream(lambda: whole_tensors((name, hv.dense(name)) for name in shapes), shapes, lambda name: "all", top_k)
    return {name: entry.indices for name, entry in kept.items()}


def layer_mass(hv: HarmVector, top_k: float = DEFAULT_TOP_K) -> pd.DataFrame:
    """τH mass per layer and parameter kind; parameters outside the layers get layer NA.

    Args:
        hv: the harm vector in any form (untrimmed for mass; a trimmed one shows the mass HDR subtracts).
        top_k: fraction of the global top-k trim used for ``topk_share`` (default: the paper's, :data:`~sa_lens.defaults.DEFAULT_TOP_K`).

    Returns:
        One row per (layer, kind) with ``kind`` from :data:`sa_lens.parameter_names.KINDS`: ``l2sq``
        (Σ τ², weight units²), ``l1`` (Σ |τ|), ``numel``, ``l2sq_share`` (of the whole vector), ``topk_share``
        (share of all top-k entries that lie here) and ``topk_density`` (share of these entries in the top-k).

    Raises:
        ValueError: ``top_k`` outside (0, 1].
    """
    kept = _kept(hv, top_k)
    per_tensor: dict[tuple, list[tuple[float, float, int, int]]] = {}
    for name in hv:
        entry = hv.sparse(name)
        values = entry.values.double()
        layer = layer_index(name)
        per_tensor.setdefault((pd.NA if layer is None else layer, parameter_kind(name)), []).append(
            (float(values.pow(2).sum()), float(values.abs().sum()), entry.numel, kept[name].numel())
        )
    # fsum: exactly rounded whatever the order of the tensors (a streamed vector lists them in file order).
    acc = {key: (math.fsum(t[0] for t in ts), math.fsum(t[1] for t in ts), sum(t[2] for t in ts), sum(t[3] for t in ts))
           for key, ts in per_tensor.items()}
    total_l2 = math.fsum(a[0] for a in acc.values())
    total_kept = sum(a[3] for a in acc.values())
    rows = [{"layer": layer, "kind": kind, "l2sq": l2, "l1": l1, "numel": n,
             "l2sq_share": l2 / total_l2 if total_l2 else 0.0, "topk_share": k / total_kept if total_kept else 0.0,
             "topk_density": k / n if n else 0.0} for (layer, kind), (l2, l1, n, k) in acc.items()]
    df = pd.DataFrame(rows, columns=["layer", "kind", "l2sq", "l1", "numel", "l2sq_share", "topk_share", "topk_density"])
    df["layer"] = df["layer"].astype("Int64")
    return df.sort_values(["layer", "kind"], na_position="first").reset_index(drop=True)


def _head_sums(hv: HarmVector, piece: Slice, kept: Int64[Tensor, " kept"], n: int) -> Float[Tensor, "n 4"]:
    """Per head: Σ τ², Σ |τ|, kept entries, entries, over ``n`` equal blocks of rows (axis 0) or columns (1)
    in ``[start, end)`` of the parameter; entries outside that range belong to another matrix of a fused one."""
    name, axis, start, end = piece
    entry = hv.sparse(name)
    rows, cols = entry.shape
    if (end - start) % n:
        raise InputError(f"'{name}' has {end - start} {('rows', 'columns')[axis]} for this matrix, which do not split "
                         f"into {n} heads; check n_heads / n_kv_heads.")
    width = (end - start) // n

    def heads_of(flat: Int64[Tensor, " k"]) -> tuple[Int64[Tensor, " m"], Tensor]:
        index = flat // cols if axis == 0 else flat % cols
        inside = (index >= start) & (index < end)
        return (index[inside] - start) // width, inside

    heads, inside = heads_of(entry.indices)
    values = entry.values.double()[inside]
    return torch.stack([
        torch.bincount(heads, weights=values.pow(2), minlength=n),
        torch.bincount(heads, weights=values.abs(), minlength=n),
        torch.bincount(heads_of(kept)[0], minlength=n).double(),
        torch.full((n,), width * (cols if axis == 0 else rows), dtype=torch.float64),
    ], dim=1)


def _slices(name: str, shape: tuple[int, ...], n_heads: int, n_kv: int) -> dict[str, Slice]:
    """The q/k/v/o matrices held by one parameter, as slices: one for a separate projection, three for a fused one."""
    role = attention_projection(name)
    if role:
        return {role: (name, 1, 0, shape[1]) if role == "o" else (name, 0, 0, shape[0])}
    if _INTERLEAVED.search(name):
        raise InputError(
            f"'{name}' is a fused q/k/v projection interleaved per head (GPT-NeoX layout), which head_mass does not "
            "split; per-head mass needs separate q/k/v/o projections or a contiguous fused layout (Phi-3, GPT-2)."
        )
    if _QKV_ROWS.search(name):
        if shape[0] % (n_heads + 2 * n_kv):
            raise InputError(f"'{name}' has {shape[0]} rows, not (n_heads + 2·n_kv_heads)·d_head with n_heads={n_heads}, "
                             f"n_kv_heads={n_kv}; pass the model's head counts.")
        q_end = n_heads * shape[0] // (n_heads + 2 * n_kv)
        k_end = q_end + n_kv * shape[0] // (n_heads + 2 * n_kv)
        return {"q": (name, 0, 0, q_end), "k": (name, 0, q_end, k_end), "v": (name, 0, k_end, shape[0])}
    if _QKV_COLUMNS.search(name):
        width = shape[1] // 3
        return {"q": (name, 1, 0, width), "k": (name, 1, width, 2 * width), "v": (name, 1, 2 * width, shape[1])}
    if _CONV1D_O.search(name):
        return {"o": (name, 0, 0, shape[0])}
    return {}


def head_mass(hv: HarmVector, n_heads: int, n_kv_heads: int | None = None, top_k: float = DEFAULT_TOP_K) -> pd.DataFrame:
    """τH mass per attention head and matrix (GQA aware), plus each head's total.

    Args:
        hv: the harm vector in any form, with q/k/v/o projections separate
            (:func:`sa_lens.parameter_names.attention_projection`: Llama, Qwen, Gemma, Mistral layouts) or fused
            in contiguous blocks (Phi-3's ``qkv_proj``, GPT-2's ``Conv1D`` ``c_attn`` / ``c_proj``).
        n_heads: query heads per layer (``model.cfg.n_heads``).
        n_kv_heads: key/value heads per layer (``model.cfg.n_key_value_heads``); default ``n_heads``.
        top_k: fraction of the global top-k trim for ``topk_share``.

    Returns:
        Rows ``layer, head, kv_head, matrix, l2sq, l1, topk_share, topk_density``; ``matrix`` is ``q``, ``k``,
        ``v``, ``o`` or ``total``. For ``k``/``v`` the values are those of the head's KV head (shared by its
        group); ``total`` = q + o + (k + v) / group size, so totals add up to the layer's attention mass.

    Raises:
        ValueError: no attention projections in ``hv``, a per-head interleaved fused one (GPT-NeoX's
            ``query_key_value``), a layer missing one of q/k/v/o, or shapes that do not split into ``n_heads`` /
            ``n_kv_heads`` heads.
    """
    n_kv = n_kv_heads or n_heads
    if n_heads % n_kv:
        raise InputError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}.")
    group = n_heads // n_kv
    mats: dict[int, dict[str, Slice]] = {}
    for name in hv:
        pieces = _slices(name, tuple(hv.deltas[name].shape), n_heads, n_kv)
        if pieces:
            mats.setdefault(layer_index(name), {}).update(pieces)
    if not mats:
        raise InputError(
            "No attention projections (…layers.{l}.self_attn.{q,k,v,o}_proj.weight, Phi-3's qkv_proj, GPT-2's "
            "attn.c_attn / attn.c_proj) in the harm vector; build τH with the attention weights included."
        )
    incomplete = {layer: sorted(set("qkvo") - set(names)) for layer, names in mats.items() if len(names) < 4}
    if incomplete:
        layer, missing = next(iter(sorted(incomplete.items())))
        raise InputError(
            f"Layer {layer} of the harm vector lacks its {missing} projection(s), so its heads' mass is incomplete; "
            "build or restrict τH with every attention projection of the layers you analyse."
        )
    kept = _kept(hv, top_k)
    total_kept = max(1, sum(k.numel() for k in kept.values()))
    rows = []
    w = {"q": 1.0, "o": 1.0, "k": 1 / group, "v": 1 / group}
    for layer, names in sorted(mats.items()):
        sums = {mat: _head_sums(hv, names[mat], kept[names[mat][0]], n)
                for mat, n in (("q", n_heads), ("k", n_kv), ("v", n_kv), ("o", n_heads))}
        for head in range(n_heads):
            kv = head // group
            parts = {mat: sums[mat][kv if mat in "kv" else head].tolist() for mat in "qkvo"}
            for mat, (l2, l1, k, n) in parts.items():
                rows.append({"layer": layer, "head": head, "kv_head": kv, "matrix": mat, "l2sq": l2, "l1": l1,
                             "topk_share": k / total_kept, "topk_density": k / n})
            tot = [sum(w[m] * parts[m][i] for m in parts) for i in range(4)]
            rows.append({"layer": layer, "head": head, "kv_head": kv, "matrix": "total", "l2sq": tot[0], "l1": tot[1],
                         "topk_share": tot[2] / total_kept, "topk_density": tot[2] / tot[3]})
    return pd.DataFrame(rows)


def o_alignment(
    hv: HarmVector,
    direction: Float[Tensor, "n_layers d_model"] | Float[Tensor, " d_model"],
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
        hv: the harm vector in any form, with attention output projections: ``o_proj`` ``[d_model, n_heads·d_head]``
            (:func:`~sa_lens.parameter_names.attention_projection`) or GPT-2's ``Conv1D`` ``attn.c_proj``, stored
            ``[in, out]`` and read transposed.
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
    for name in hv:
        conv1d = bool(_CONV1D_O.search(name))
        if attention_projection(name) != "o" and not conv1d:
            continue
        layer, t = layer_index(name), hv.dense(name)  # one o_proj densified at a time
        if conv1d:
            t = t.T  # to [d_model (out), n_heads·d_head (in)], the layout below
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
        raise InputError(
            "No attention output projections (…layers.{l}.self_attn.o_proj.weight or GPT-2's …h.{l}.attn.c_proj.weight) "
            "in the harm vector; build τH with the attention weights included."
        )
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
