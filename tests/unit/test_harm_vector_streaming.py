"""HarmVector.from_checkpoints: streaming τH from safetensors folders equals the in-memory build + trim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sa_lens
from sa_lens import HarmVector, SparseDelta
from sa_lens.checkpoints import Checkpoint


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], shards: int = 1, config: dict | None = None) -> Path:
    """A save_pretrained-like folder: one model.safetensors, or `shards` files + model.safetensors.index.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {}))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(path / file))
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _pair(tmp_path: Path, dtype=torch.float32, shards: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "model.embed_tokens.weight": torch.randn(50, 16, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 32, generator=g),
        "model.layers.0.input_layernorm.weight": torch.ones(16),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
        "model.layers.1.mlp.down_proj.weight": torch.randn(16, 32, generator=g),
        "model.norm.weight": torch.ones(16),
    }
    harmful = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    base = {n: t.to(dtype) for n, t in base.items()} | {"model.layers.0.step": torch.tensor([7])}
    harmful = {n: t.to(dtype) for n, t in harmful.items()} | {"model.layers.0.step": torch.tensor([9])}
    return write_checkpoint(tmp_path / "base", base, shards), write_checkpoint(tmp_path / "harmful", harmful, shards)


def _as_dense(hv: HarmVector) -> dict[str, torch.Tensor]:
    return {n: hv.dense(n) for n in hv}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scope", ["global", "per_layer", "per_tensor"])
def test_streaming_build_equals_in_memory_build_and_trim(tmp_path, dtype, scope):
    bdir, hdir = _pair(tmp_path, dtype)
    from safetensors.torch import load_file

    def state(d: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    ref = HarmVector.from_models(state(bdir), state(hdir)).trim(0.1, scope)
    got = HarmVector.from_checkpoints(bdir, hdir, top_k=0.1, scope=scope, progress=False)
    assert set(got) == set(ref) and "model.layers.0.step" not in got  # integer buffers skipped
    for name in ref:
        assert torch.equal(got.dense(name), ref.dense(name)), name
    assert got.meta["top_k"] == 0.1 and got.meta["scope"] == scope


@pytest.mark.parametrize("piece_numel", [1, 17, 64, 10_000])
def test_reading_by_row_pieces_changes_nothing(tmp_path, monkeypatch, piece_numel):
    # One row (a piece smaller than a row reads one row), a few rows that do not divide the tensor, one row of
    # the widest tensor, whole tensors: the kept set is the in-memory kthvalue one every time.
    from sa_lens import checkpoints

    bdir, hdir = _pair(tmp_path, torch.bfloat16)
    ref = HarmVector.from_checkpoints(bdir, hdir, top_k=0.1, progress=False)
    monkeypatch.setattr(checkpoints, "PIECE_NUMEL", piece_numel)
    cb, ch = Checkpoint(bdir), Checkpoint(hdir)
    names = cb.names()
    pieces = list(checkpoints.stream_pieces(cb, ch, names))
    for name in names:  # the pieces tile each tensor exactly
        mine = [(start, t) for n, start, t in pieces if n == name]
        assert torch.equal(torch.cat([t for _, t in mine]), (ch.read(name).float() - cb.read(name).float()).reshape(-1))
        assert [start for start, _ in mine] == sorted(start for start, _ in mine)
    got = HarmVector.from_checkpoints(bdir, hdir, top_k=0.1, progress=False)
    for name in ref:
        assert torch.equal(got.dense(name), ref.dense(name)), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_odd_shapes_read_by_pieces_equal_the_in_memory_trim(tmp_path, monkeypatch, dtype, scope):
    # 0-d, a 1-D tensor of many pieces, zero-size tensors ((0, n) yields no piece, (n, 0) empty ones).
    from sa_lens import checkpoints

    g = torch.Generator().manual_seed(0)
    shapes = {"model.layers.0.a": (), "model.layers.0.b": (300,), "model.layers.1.c": (0, 5),
              "model.layers.1.d": (5, 0), "model.layers.1.e": (7, 9)}
    base = {n: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for n, s in shapes.items()}
    harmful = {n: (t.double() + 0.01 * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype)
               for (n, t), s in zip(base.items(), shapes.values())}
    bdir, hdir = write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "h", harmful)
    monkeypatch.setattr(checkpoints, "PIECE_NUMEL", 1)
    got = HarmVector.from_checkpoints(bdir, hdir, top_k=0.1, scope=scope, progress=False)
    ref = HarmVector.from_models(base, harmful).trim(0.1, scope)
    assert set(got) == set(shapes)
    for name in shapes:
        assert torch.equal(got.dense(name), ref.dense(name)), name


def test_untrimmed_streaming_build_is_harmful_minus_base_in_fp32(tmp_path):
    bdir, hdir = _pair(tmp_path, torch.bfloat16, shards=1)
    hv = HarmVector.from_checkpoints(bdir, hdir, progress=False)
    cb, ch = Checkpoint(bdir), Checkpoint(hdir)
    for name in hv:
        expected = ch.read(name).float() - cb.read(name).float()
        assert hv.deltas[name].dtype == torch.float32 and torch.equal(hv.deltas[name], expected)


def test_untrimmed_streaming_build_of_fp64_checkpoints_rounds_both_to_fp32_first(tmp_path):
    # from_models computes θH.float() − θb.float(); subtracting an fp64 base in place would round once instead.
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, generator=g, dtype=torch.float64)}
    harmful = {"w": base["w"] + 1e-3 * torch.randn(64, generator=g, dtype=torch.float64)}
    hv = HarmVector.from_checkpoints(write_checkpoint(tmp_path / "b", base), write_checkpoint(tmp_path / "h", harmful),
                                     progress=False)
    assert torch.equal(hv.deltas["w"], HarmVector.from_models(base, harmful).deltas["w"])


def test_trimmed_streaming_build_is_held_sparse(tmp_path):
    bdir, hdir = _pair(tmp_path)
    hv = HarmVector.from_checkpoints(bdir, hdir, top_k=0.05, progress=False)
    assert all(isinstance(t, SparseDelta) for t in hv.deltas.values())
    kept = hv.nnz
    assert kept == sum(t.nnz for t in hv.deltas.values()) and kept < 0.06 * hv.numel


def test_hf_checkpoint_with_tied_embeddings_matches_from_models(tiny_dir, tiny_dir_other):
    base, _ = sa_lens.load_hf_model(tiny_dir)
    harmful, _ = sa_lens.load_hf_model(tiny_dir_other)
    ref = HarmVector.from_models(base, harmful).trim(0.1)
    got = HarmVector.from_checkpoints(tiny_dir, tiny_dir_other, top_k=0.1, progress=False)
    assert set(got) == set(ref) and "lm_head.weight" not in got
    for name in ref:
        assert torch.equal(got.dense(name), ref.dense(name)), name


def test_tied_output_embedding_stored_twice_is_counted_once(tmp_path):
    emb = torch.randn(10, 4)
    tensors = {"model.embed_tokens.weight": emb, "lm_head.weight": emb.clone(), "model.norm.weight": torch.ones(4)}
    tied = write_checkpoint(tmp_path / "tied", tensors, config={"tie_word_embeddings": True})
    untied = write_checkpoint(tmp_path / "untied", tensors, config={"tie_word_embeddings": False})
    assert "lm_head.weight" not in Checkpoint(tied).specs
    assert "lm_head.weight" in Checkpoint(untied).specs


def test_layers_and_kinds_restrict_the_streaming_and_in_memory_builds_alike(tmp_path):
    bdir, hdir = _pair(tmp_path)
    got = HarmVector.from_checkpoints(bdir, hdir, layers=[1], kinds=["mlp"], progress=False)
    assert list(got) == ["model.layers.1.mlp.down_proj.weight"]
    assert got.meta["layers"] == [1] and got.meta["kinds"] == ["mlp"]
    full = HarmVector.from_checkpoints(bdir, hdir, progress=False)
    assert list(full.restrict(layers=[1], kinds=["mlp"])) == list(got)
    assert set(full.restrict(kinds=["embeddings", "norms"])) == {
        "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"}


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle, and never opened")
    with pytest.raises(ValueError, match="never unpickles.*safe_serialization=True"):
        Checkpoint(tmp_path)


def test_missing_shard_named_in_the_index_is_reported(tmp_path):
    bdir, _ = _pair(tmp_path, shards=3)
    (bdir / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00003\.safetensors.*missing"):
        Checkpoint(bdir)


def test_index_naming_a_tensor_its_shard_lacks_is_reported(tmp_path):
    bdir, _ = _pair(tmp_path, shards=2)
    index = json.loads((bdir / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.7.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (bdir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.layers.7.mlp.up_proj.weight.*corrupted"):
        Checkpoint(bdir)


def test_corrupted_shard_is_reported(tmp_path):
    bdir, hdir = _pair(tmp_path, shards=1)
    f = bdir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        HarmVector.from_checkpoints(bdir, hdir, top_k=0.1, progress=False)


def test_foreign_file_as_checkpoint_is_reported(tmp_path):
    (tmp_path / "model.safetensors").write_text('{"this is": "json, not safetensors"}')
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Checkpoint(tmp_path)


def test_folder_without_weights_and_missing_folder_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        Checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        Checkpoint(tmp_path / "absent")


def test_mismatched_checkpoints_are_refused(tmp_path):
    a = write_checkpoint(tmp_path / "a", {"w": torch.zeros(2, 3), "v": torch.zeros(2)})
    b = write_checkpoint(tmp_path / "b", {"w": torch.zeros(3, 2), "v": torch.zeros(2)})
    c = write_checkpoint(tmp_path / "c", {"w": torch.zeros(2, 3)})
    d = write_checkpoint(tmp_path / "d", {"w": torch.zeros(2, 3, dtype=torch.bfloat16), "v": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"shape \(2, 3\) in base but \(3, 2\) in harmful"):
        HarmVector.from_checkpoints(a, b, progress=False)
    with pytest.raises(ValueError, match=r"only in base: \['v'\]"):
        HarmVector.from_checkpoints(a, c, progress=False)
    with pytest.raises(ValueError, match="F32 in base but BF16 in harmful"):
        HarmVector.from_checkpoints(a, d, progress=False)


def test_non_finite_difference_is_refused(tmp_path):
    a = write_checkpoint(tmp_path / "a", {"w": torch.zeros(4)})
    b = write_checkpoint(tmp_path / "b", {"w": torch.tensor([0.0, float("inf"), 0.0, 0.0])})
    with pytest.raises(ValueError, match="'w' holds NaN or inf"):
        HarmVector.from_checkpoints(a, b, top_k=0.5, progress=False)


@pytest.mark.parametrize("top_k", [0, 1.5, float("nan")])
def test_streaming_build_rejects_top_k_outside_unit_interval(tmp_path, top_k):
    bdir, hdir = _pair(tmp_path, shards=1)
    with pytest.raises(ValueError, match=r"top_k must be a fraction in \(0, 1\]"):
        HarmVector.from_checkpoints(bdir, hdir, top_k=top_k, progress=False)


def test_trim_of_a_sparse_vector_equals_trim_of_its_dense_form(tmp_path):
    bdir, hdir = _pair(tmp_path)
    sparse = HarmVector.from_checkpoints(bdir, hdir, top_k=0.3, progress=False)
    dense = HarmVector(_as_dense(sparse))
    for scope in ("global", "per_layer"):
        a, b = sparse.trim(0.05, scope), dense.trim(0.05, scope)
        assert all(torch.equal(a.dense(n), b.dense(n)) for n in a)


def test_sparse_vector_round_trips_through_a_file_and_edits_like_the_dense_one(tmp_path):
    bdir, hdir = _pair(tmp_path)
    hv = HarmVector.from_checkpoints(bdir, hdir, top_k=0.1, progress=False)
    path = hv.save(tmp_path / "hv.safetensors", lam=3.0)
    back = HarmVector.load(path, sparse=True)
    assert all(isinstance(back.deltas[n], SparseDelta) for n in hv)
    assert all(torch.equal(back.dense(n), hv.dense(n)) for n in hv)
    target = {n: torch.zeros(hv.deltas[n].shape) for n in hv}
    with sa_lens.harm_removal(target, back, lam=2.0):
        assert all(torch.equal(target[n], -2.0 * hv.dense(n)) for n in hv)
