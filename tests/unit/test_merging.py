"""TIES merge and DARE on harm vectors: reference agreement, determinism, storage independence."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sa_lens import HarmVector, SparseDelta, dare, ties_merge

SHAPES = {"model.layers.0.w": (3, 4), "model.layers.1.w": (5,)}


def _official_ties(flat: torch.Tensor, top_k: float) -> torch.Tensor:
    """HDR/Ties_Merge.py's recipe on [n_vectors, d]: topk_values_mask, resolve_sign('majority'), disjoint_merge."""
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(top_k * d), dim=1, keepdim=True).values if d - int(top_k * d) else None
    trimmed = flat * (flat.abs() >= kth) if kth is not None else flat
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    return selected.sum(0) / (selected != 0).sum(0).clamp(min=1)


def _vector(flat: torch.Tensor) -> HarmVector:
    out, start = {}, 0
    for name, shape in SHAPES.items():
        n = torch.Size(shape).numel()
        out[name] = flat[start : start + n].reshape(shape).clone()
        start += n
    return HarmVector(out)


def _flat(hv: HarmVector) -> torch.Tensor:
    return torch.cat([hv.dense(n).reshape(-1) for n in SHAPES])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 4), top_k=st.floats(0.05, 1.0), levels=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_ties_matches_the_official_flat_recipe(n, top_k, levels, seed):
    g = torch.Generator().manual_seed(seed)
    flat = (torch.randint(-levels, levels + 1, (n, 17), generator=g) * 0.5).float()
    merged = ties_merge([_vector(row) for row in flat], top_k=top_k)
    assert torch.equal(_flat(merged), _official_ties(flat, top_k))


def test_ties_of_one_vector_is_its_trim():
    hv = _vector(torch.randn(17, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(_flat(ties_merge([hv], top_k=0.1)), _flat(hv.trim(0.1)))


def test_ties_averages_only_the_entries_that_agree_with_the_elected_sign():
    a = _vector(torch.tensor([3.0, -1.0, 2.0] + [0.0] * 14))
    b = _vector(torch.tensor([1.0, 4.0, -2.0] + [0.0] * 14))
    merged = _flat(ties_merge([a, b], top_k=None))
    # entry 0: both positive → mean 2; entry 1: sum 3 > 0 → only b's 4; entry 2: sum 0 → majority sign (+) → a's 2
    assert merged[:3].tolist() == [2.0, 4.0, 2.0]


def test_ties_refuses_vectors_over_different_parameters():
    with pytest.raises(ValueError, match="same parameter names and shapes"):
        ties_merge([HarmVector({"a": torch.zeros(2)}), HarmVector({"a": torch.zeros(3)})])
    with pytest.raises(ValueError, match="at least one"):
        ties_merge([])


def test_dare_drops_with_probability_p_and_rescales_survivors():
    t = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    out = dare(HarmVector({"w": t}), p=0.9, seed=3).deltas["w"]
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.005
    assert torch.equal(out[kept], t[kept] / (1 - 0.9))


def test_dare_is_deterministic_per_seed_and_independent_of_storage_and_order():
    g = torch.Generator().manual_seed(2)
    dense = HarmVector({"a": torch.randn(40, 30, generator=g), "b": torch.randn(50, generator=g)}).trim(0.2)
    sparse = HarmVector({n: SparseDelta.from_dense(dense.deltas[n]) for n in ("b", "a")})
    one, two = dare(dense, 0.5, seed=7), dare(sparse, 0.5, seed=7)
    assert isinstance(two.deltas["a"], SparseDelta)
    assert all(torch.equal(one.dense(n), two.dense(n)) for n in ("a", "b"))
    assert not torch.equal(one.dense("a"), dare(dense, 0.5, seed=8).dense("a"))
    assert torch.equal(dare(dense, 0.0).dense("a"), dense.dense("a"))


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan"), "0.5"])
def test_dare_rejects_p_outside_zero_one(p):
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        dare(HarmVector({"w": torch.ones(3)}), p)


def test_dare_accepts_a_numpy_drop_probability():
    import numpy as np

    hv = HarmVector({"w": torch.randn(200, generator=torch.Generator().manual_seed(0))})
    assert torch.equal(dare(hv, np.float32(0.5), seed=1).dense("w"), dare(hv, 0.5, seed=1).dense("w"))
