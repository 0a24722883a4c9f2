"""HarmVector: τH = θH − θb per parameter, exact top-k trims, clear errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sa_lens
from sa_lens import HarmVector, checkpoint_parameters, topk


def _reference_mask(tensors: list[torch.Tensor], top_k: float) -> list[torch.Tensor]:
    """The official code's rule: kthvalue over the concatenated |τ| at d − ⌊k·d⌋, keep |τ| ≥ it."""
    flat = torch.cat([t.abs().flatten() for t in tensors])
    d = flat.numel()
    m = d - int(top_k * d)
    if m == 0:
        return [torch.ones_like(t, dtype=torch.bool) for t in tensors]
    threshold = flat.kthvalue(m).values
    return [t.abs() >= threshold for t in tensors]


def test_from_models_is_harmful_minus_base_per_checkpoint_name(tiny_dir, tiny_dir_other):
    base, _ = sa_lens.load_hf_model(tiny_dir)
    harmful, _ = sa_lens.load_hf_model(tiny_dir_other)
    hv = HarmVector.from_models(base, harmful)
    pb, ph = checkpoint_parameters(base), checkpoint_parameters(harmful)
    assert set(hv) == set(pb)
    for name, delta in hv.items():
        assert delta.dtype == torch.float32
        assert torch.equal(delta, ph[name].float() - pb[name].float())


def test_bridge_and_hf_model_give_the_same_keys(tiny_dir, tiny_bridge):
    hf, _ = sa_lens.load_hf_model(tiny_dir)
    bridge_keys = set(checkpoint_parameters(tiny_bridge))
    assert bridge_keys == set(checkpoint_parameters(hf))
    assert not any("_original_component" in k for k in bridge_keys)
    # Tied embeddings appear once, so an edit never hits the same storage twice.
    assert "lm_head.weight" not in bridge_keys


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    top_k=st.floats(0.01, 1.0),
    levels=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    slack=st.sampled_from([0, None]),
)
def test_global_trim_matches_kthvalue_with_ties(sizes, top_k, levels, seed, slack):
    g = torch.Generator().manual_seed(seed)
    # Few distinct magnitudes → many ties at the threshold.
    tensors = [(torch.randint(-levels, levels + 1, (n,), generator=g) * 0.25).float() for n in sizes]
    hv = HarmVector({f"model.layers.{i}.w": t for i, t in enumerate(tensors)})
    trimmed = hv.trim(top_k, scope="global")
    # slack 0 prunes after every tensor (exact low-bit cuts included); None prunes rarely.
    kept = topk.trim_stream(lambda: topk.whole_tensors(hv.items()), {n: tuple(t.shape) for n, t in hv.items()},
                            lambda n: "all", top_k, slack=slack)
    for (name, t), ref in zip(trimmed.items(), _reference_mask(tensors, top_k)):
        orig = hv.deltas[name]
        assert torch.equal(t, torch.where(ref, orig, torch.zeros(())))
        ref = ref & (orig != 0)  # zeros under a threshold of 0 are "kept" but never held
        assert torch.equal(kept[name].indices, torch.nonzero(ref).squeeze(1))
        assert torch.equal(kept[name].values, orig[ref])


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    top_k=st.floats(0.01, 1.0),
    cuts=st.lists(st.integers(1, 29), max_size=6),
    seed=st.integers(0, 2**16),
    slack=st.sampled_from([0, None]),
)
def test_pieces_in_any_order_give_the_kthvalue_mask(sizes, top_k, cuts, seed, slack):
    # Tensors cut into flat pieces at arbitrary offsets, pieces of different tensors interleaved at random:
    # the kept entries are those of kthvalue over everything, joined per tensor in index order.
    g = torch.Generator().manual_seed(seed)
    tensors = [(torch.randint(-3, 4, (n,), generator=g) * 0.5).float() for n in sizes]
    pieces = []
    for i, t in enumerate(tensors):
        bounds = sorted({0, t.numel(), *(c for c in cuts if c < t.numel())})
        pieces += [(f"w{i}", a, t[a:b]) for a, b in zip(bounds, bounds[1:])]
    order = torch.randperm(len(pieces), generator=g).tolist()
    kept = topk.trim_stream(lambda: (pieces[j] for j in order), {f"w{i}": tuple(t.shape) for i, t in enumerate(tensors)},
                            lambda n: "all", top_k, slack=slack)
    for i, (t, ref) in enumerate(zip(tensors, _reference_mask(tensors, top_k))):
        ref = ref & (t != 0)
        assert torch.equal(kept[f"w{i}"].indices, torch.nonzero(ref).squeeze(1))
        assert torch.equal(kept[f"w{i}"].values, t[ref])


def test_empty_pieces_sharing_an_offset_leave_the_kept_set_alone():
    # The rows of a (5, 0) tensor are five empty pieces, all at offset 0 (stream_pieces with small pieces).
    # Counted as five members under one key they stopped the final prune's walk early: 18 entries kept, not 7.
    t = torch.randn(7, 9, generator=torch.Generator().manual_seed(0))
    shapes = {"d": (5, 0), "e": (7, 9)}
    pieces = [("d", 0, torch.empty(0))] * 5 + [("e", 9 * i, t[i]) for i in range(7)]
    kept = topk.trim_stream(lambda: iter(pieces), shapes, lambda n: "all", 0.1)
    ref = _reference_mask([t], 0.1)[0].reshape(-1)
    assert kept["d"].shape == (5, 0) and kept["d"].indices.numel() == 0
    assert torch.equal(kept["e"].indices, torch.nonzero(ref).squeeze(1))
    assert torch.equal(kept["e"].values, t.reshape(-1)[ref])


@pytest.mark.parametrize("slack", [0, 5, None])
def test_chunked_insertion_and_pruning_keep_the_kthvalue_mask(monkeypatch, slack):
    monkeypatch.setattr(topk, "_CHUNK", 7)  # many chunks per tensor, prunes between them
    monkeypatch.setattr(topk, "_INSERT_CHUNK", 5)
    g = torch.Generator().manual_seed(3)
    tensors = [(torch.randint(-9, 10, (n,), generator=g) * 0.5).float() for n in (50, 3, 41, 64)]
    hv = HarmVector({f"model.layers.{i}.w": t for i, t in enumerate(tensors)})
    kept = topk.trim_stream(lambda: topk.whole_tensors(hv.items()), {n: tuple(t.shape) for n, t in hv.items()},
                            lambda n: "all", 0.15, slack=slack)
    for (name, t), ref in zip(hv.items(), _reference_mask(tensors, 0.15)):
        ref = ref & (t != 0)
        assert torch.equal(kept[name].indices, torch.nonzero(ref).squeeze(1)), name
        assert torch.equal(kept[name].values, t[ref]), name


@pytest.mark.parametrize("top_k", [0.1, 1.0])
def test_trim_never_holds_the_zeros_of_a_mostly_zero_vector(top_k):
    # A fine-tune that left most tensors untouched: under 10 % of τH is non-zero, so the kthvalue
    # threshold is 0. The zeros it "keeps" must not be held, nor turn a sparse vector dense.
    from sa_lens.sparse_delta import SparseDelta

    d = {f"model.layers.{i}.mlp.w.weight": torch.zeros(100, 100) for i in range(4)}
    d["model.layers.0.mlp.w.weight"][:5] = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    sparse = HarmVector({n: SparseDelta.from_dense(v) for n, v in d.items()})
    trimmed = sparse.trim(top_k)
    assert all(isinstance(t, SparseDelta) for t in trimmed.deltas.values())
    assert sum(t.nnz for t in trimmed.deltas.values()) == 500
    for name in d:
        assert torch.equal(trimmed.dense(name), d[name])
    kept = topk.trim_stream(lambda: topk.whole_tensors(d.items()), {n: tuple(t.shape) for n, t in d.items()},
                            lambda n: "all", 0.1)
    assert sum(e.indices.numel() for e in kept.values()) == 500


def test_global_trim_keeps_the_requested_share_of_distinct_values():
    t = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    hv = HarmVector({"a": t[:3000].clone(), "b": t[3000:].clone()})
    trimmed = hv.trim(0.10)
    assert trimmed.nnz == 1001  # ⌊0.1·d⌋ + 1: the official kthvalue rule keeps the threshold entry too
    kept = torch.cat([trimmed.deltas["a"], trimmed.deltas["b"]])
    assert kept.abs()[kept != 0].min() >= t.abs().sort(descending=True).values[1000]


def test_per_tensor_and_per_layer_scopes_threshold_each_group():
    g = torch.Generator().manual_seed(1)
    big = torch.randn(1000, generator=g) * 10
    small = torch.randn(1000, generator=g) * 0.01
    hv = HarmVector({"model.layers.0.big": big, "model.layers.1.small": small, "model.norm.weight": small.clone()})
    assert hv.trim(0.1, "global").deltas["model.layers.1.small"].count_nonzero() == 0
    per_tensor = hv.trim(0.1, "per_tensor")
    per_layer = hv.trim(0.1, "per_layer")
    for name in hv:
        ref = _reference_mask([hv.deltas[name]], 0.1)[0]
        assert torch.equal(per_tensor.deltas[name] != 0, ref)
        assert torch.equal(per_layer.deltas[name] != 0, ref)  # one tensor per layer group here
    assert per_tensor.meta["scope"] == "per_tensor"


def test_top_k_one_keeps_everything():
    t = torch.randn(50)
    assert torch.equal(HarmVector({"w": t}).trim(1.0).deltas["w"], t)


@pytest.mark.parametrize("top_k", [0, -0.1, 1.5, float("nan"), "0.1"])
def test_trim_rejects_top_k_outside_unit_interval(top_k):
    with pytest.raises(ValueError, match=r"top_k must be a fraction in \(0, 1\]"):
        HarmVector({"w": torch.randn(4)}).trim(top_k)


def test_trim_rejects_unknown_scope():
    with pytest.raises(ValueError, match="scope must be"):
        HarmVector({"w": torch.randn(4)}).trim(0.5, scope="per_head")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_vector_is_refused(bad):
    t = torch.zeros(5)
    t[2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        HarmVector({"model.layers.0.w": t})


def test_different_parameter_names_are_refused():
    with pytest.raises(ValueError, match="different parameter names.*only in base: \\['b'\\]"):
        HarmVector.from_models({"a": torch.zeros(2), "b": torch.zeros(2)}, {"a": torch.zeros(2), "c": torch.zeros(2)})


def test_different_shapes_are_refused():
    with pytest.raises(ValueError, match="shape \\(2,\\) in base but \\(3,\\) in harmful"):
        HarmVector.from_models({"a": torch.zeros(2)}, {"a": torch.zeros(3)})


def test_bridge_in_compatibility_mode_is_refused(tiny_bridge):
    tiny_bridge.enable_compatibility_mode()
    with pytest.raises(ValueError, match="enable_compatibility_mode"):
        checkpoint_parameters(tiny_bridge)


def test_models_in_different_dtypes_are_refused():
    with pytest.raises(ValueError, match="float32 in base but torch.bfloat16 in harmful"):
        HarmVector.from_models({"a": torch.zeros(2)}, {"a": torch.zeros(2, dtype=torch.bfloat16)})


def test_harm_vector_and_sparse_delta_reprs_are_short_and_say_what_they_hold():
    hv = HarmVector({"w": torch.arange(1.0, 1001.0).reshape(10, 100), "b": torch.zeros(5)},
                    {"base": "θb", "harmful": "θH", "top_k": None, "scope": None})
    assert repr(hv) == "HarmVector(tensors=2, numel=1,005, nnz=1,000, base='θb', harmful='θH')"
    trimmed = hv.trim(0.05, count="exact")
    assert repr(trimmed) == (
        "HarmVector(tensors=2, numel=1,005, nnz=50, base='θb', harmful='θH', top_k=0.05, scope='global', count='exact')"
    )
    assert repr(trimmed.sparse("w")) == "SparseDelta(shape=(10, 100), nnz=50, density=0.05)"
