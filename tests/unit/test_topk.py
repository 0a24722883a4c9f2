"""sa_lens.topk: which entries a top-k trim keeps (official kthvalue count vs exact count), every scope."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from sa_lens import HarmVector
from sa_lens.topk import kept_rank, trim_stream, whole_tensors

SCOPES = ["global", "per_layer", "per_tensor"]
# Two layers and one parameter outside them: three groups per_layer, four per_tensor, one global.
SHAPES = {
    "model.layers.0.mlp.down_proj.weight": (20, 30),  # 600
    "model.layers.0.self_attn.q_proj.weight": (10, 10),  # 100
    "model.layers.1.mlp.down_proj.weight": (10, 20),  # 200
    "model.norm.weight": (100,),  # 100
}


def _groups(scope: str) -> list[list[str]]:
    if scope == "global":
        return [list(SHAPES)]
    if scope == "per_tensor":
        return [[n] for n in SHAPES]
    return [[n for n in SHAPES if f"layers.{i}." in n] for i in (0, 1)] + [["model.norm.weight"]]


def _no_ties() -> HarmVector:
    # Distinct magnitudes everywhere: a random permutation of 1..1000, random signs.
    g = torch.Generator().manual_seed(0)
    flat = (torch.randperm(1000, generator=g) + 1).float() * (torch.randint(0, 2, (1000,), generator=g) * 2 - 1)
    out, start = {}, 0
    for name, shape in SHAPES.items():
        n = math.prod(shape)
        out[name] = flat[start : start + n].reshape(shape).clone()
        start += n
    return HarmVector(out)


def _all_ties() -> HarmVector:
    return HarmVector({name: torch.full(shape, -0.5) for name, shape in SHAPES.items()})


def _kept(hv: HarmVector) -> dict[str, torch.Tensor]:
    return {n: hv.dense(n).reshape(-1) != 0 for n in hv}


@pytest.mark.parametrize("scope", SCOPES)
def test_official_count_without_ties_is_floor_k_d_plus_one_per_group(scope):
    kept = _kept(_no_ties().trim(0.05, scope))
    for group in _groups(scope):
        d = sum(math.prod(SHAPES[n]) for n in group)
        assert sum(int(kept[n].sum()) for n in group) == int(0.05 * d) + 1


def test_official_count_of_1000_entries_at_five_percent_is_51():
    hv = HarmVector({"w": torch.arange(1, 1001, dtype=torch.float32)})
    assert hv.trim(0.05).nnz == 51
    assert hv.trim(0.05, count="exact").nnz == 50


@pytest.mark.parametrize("scope", SCOPES)
def test_exact_count_without_ties_is_k_d_rounded_per_group_and_the_largest(scope):
    hv = _no_ties()
    kept = _kept(hv.trim(0.05, scope, count="exact"))
    for group in _groups(scope):
        d = sum(math.prod(SHAPES[n]) for n in group)
        n_keep = math.floor(0.05 * d + 0.5)
        assert sum(int(kept[n].sum()) for n in group) == n_keep
        mags = torch.cat([hv.dense(n).reshape(-1).abs() for n in group])
        chosen = torch.cat([kept[n] for n in group])
        assert torch.equal(torch.sort(mags[chosen]).values, torch.sort(mags).values[-n_keep:])


@pytest.mark.parametrize("scope", SCOPES)
def test_official_count_keeps_every_tie(scope):
    kept = _kept(_all_ties().trim(0.05, scope))
    assert all(bool(k.all()) for k in kept.values())


@pytest.mark.parametrize("scope", SCOPES)
def test_exact_count_breaks_ties_by_name_then_flat_index(scope):
    kept = _kept(_all_ties().trim(0.05, scope, count="exact"))
    for group in _groups(scope):
        n_left = math.floor(0.05 * sum(math.prod(SHAPES[n]) for n in group) + 0.5)
        for name in sorted(group):  # the first names in string order fill up first, low indices first
            size = math.prod(SHAPES[name])
            take = min(n_left, size)
            expected = torch.zeros(size, dtype=torch.bool)
            expected[:take] = True
            assert torch.equal(kept[name], expected), name
            n_left -= take


def test_exact_count_does_not_depend_on_arrival_order_or_pieces():
    hv = _all_ties()
    shapes = {n: tuple(t.shape) for n, t in hv.items()}
    ref = trim_stream(lambda: whole_tensors(hv.items()), shapes, lambda n: "all", 0.3, count="exact")

    def reversed_rows():  # names backwards, each tensor as single rows, last row first
        for name in reversed(list(shapes)):
            flat = hv.dense(name).reshape(-1)
            step = shapes[name][-1]
            for start in reversed(range(0, flat.numel(), step)):
                yield name, start, flat[start : start + step]

    got = trim_stream(reversed_rows, shapes, lambda n: "all", 0.3, slack=7, count="exact")
    for name in shapes:
        assert torch.equal(got[name].indices, ref[name].indices), name


def test_exact_count_of_zero_keeps_nothing_and_zeros_are_never_stored():
    tiny = HarmVector({"a": torch.ones(4), "b": torch.tensor([0.0, 0.0, 0.0, 2.0])})
    assert tiny.trim(0.1, "per_tensor", count="exact").nnz == 0  # round(0.4) = 0 per tensor
    assert tiny.trim(1.0, count="exact").nnz == 5


def test_kept_rank_rounds_half_up_and_exact_count_is_recorded():
    assert kept_rank(0.05, 1000) == 51 and kept_rank(0.05, 1000, "exact") == 50
    assert kept_rank(0.5, 3, "exact") == 2 and kept_rank(0.07, 100, "exact") == 7
    hv = _no_ties()
    assert "count" not in hv.trim(0.1).meta  # the default leaves the sidecar as before
    exact = hv.trim(0.1, count="exact")
    assert exact.meta["count"] == "exact" and "count" not in exact.trim(0.05).meta


def test_unknown_count_is_refused():
    with pytest.raises(ValueError, match="count must be one of"):
        _no_ties().trim(0.1, count="nearest")


def _write(path, tensors):
    path.mkdir()
    (path / "config.json").write_text("{}")
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("count", ["official", "exact"])
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("ties", [False, True])
def test_streaming_trim_equals_in_memory_trim(tmp_path, count, scope, ties):
    base = {n: torch.zeros(s) for n, s in SHAPES.items()}
    tau = _all_ties() if ties else _no_ties()
    harmful = {n: tau.dense(n).clone() for n in SHAPES}
    bdir, hdir = _write(tmp_path / "base", base), _write(tmp_path / "harmful", harmful)
    streamed = HarmVector.from_checkpoints(bdir, hdir, top_k=0.05, scope=scope, count=count, progress=False)
    in_memory = HarmVector(harmful).trim(0.05, scope, count)
    for name in SHAPES:
        assert torch.equal(streamed.dense(name), in_memory.dense(name)), name
