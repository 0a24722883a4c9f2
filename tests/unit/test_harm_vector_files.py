"""HarmVector.save / load: safetensors + JSON sidecar, sparse when trimmed, checked against the target."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sa_lens import HarmVector


@pytest.fixture()
def hv() -> HarmVector:
    g = torch.Generator().manual_seed(0)
    deltas = {"model.layers.0.w": torch.randn(40, 30, generator=g), "model.norm.weight": torch.randn(30, generator=g)}
    return HarmVector(deltas, {"base": "b", "harmful": "h", "top_k": None, "scope": None})


@pytest.mark.parametrize("top_k", [None, 0.1])
def test_round_trip_is_exact_and_records_provenance(hv, tmp_path, top_k):
    vec = hv if top_k is None else hv.trim(top_k)
    path = vec.save(tmp_path / "hv.safetensors", lam=3.0)
    back = HarmVector.load(path)
    assert set(back) == set(vec)
    for name, t in vec.items():
        assert torch.equal(back.deltas[name], t)
    side = json.loads((tmp_path / "hv.json").read_text())
    assert side["format"] == "sa_lens.harm_vector" and side["lam_suggested"] == 3.0
    assert side["meta"]["top_k"] == top_k and "sa_lens_version" in side and len(side["names_sha256"]) == 64
    assert set(side["encoding"].values()) == ({"dense"} if top_k is None else {"sparse"})


def test_trimmed_vector_file_is_smaller_than_dense(hv, tmp_path):
    dense = hv.save(tmp_path / "dense.safetensors").stat().st_size
    sparse = hv.trim(0.1).save(tmp_path / "sparse.safetensors").stat().st_size
    assert sparse < 0.5 * dense


def test_load_refuses_a_vector_for_another_architecture_unless_restricted(hv, tmp_path):
    path = hv.save(tmp_path / "hv.safetensors")
    target = {"model.layers.0.w": torch.zeros(40, 30), "model.norm.weight": torch.zeros(31)}
    with pytest.raises(ValueError, match="restrict=True"):
        HarmVector.load(path, target=target)
    restricted = HarmVector.load(path, target=target, restrict=True)
    assert list(restricted) == ["model.layers.0.w"] and restricted.meta["restricted_to_target"]


def test_truncated_file_is_reported_as_corrupted(hv, tmp_path):
    path = hv.save(tmp_path / "hv.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupted"):
        HarmVector.load(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not written by sa_lens"):
        HarmVector.load(path)


def test_file_of_another_kind_is_refused(hv, tmp_path):
    path = hv.save(tmp_path / "hv.safetensors")
    side = json.loads((tmp_path / "hv.json").read_text())
    (tmp_path / "hv.json").write_text(json.dumps({**side, "format": "sa_lens.safety_vector"}))
    with pytest.raises(ValueError, match="holds a 'sa_lens.safety_vector'"):
        HarmVector.load(path)


def _write_consistent(sidecar_path, side) -> None:
    """A crafted sidecar whose names hash agrees with its edited shapes, so the tensor-level checks are reached."""
    from sa_lens.harm_vector import _names_hash

    sidecar_path.write_text(json.dumps({**side, "names_sha256": _names_hash(side["shapes"])}))


def test_sidecar_shapes_edited_without_their_hash_are_reported(hv, tmp_path):
    path = hv.trim(0.1).save(tmp_path / "hv.safetensors")
    side = json.loads((tmp_path / "hv.json").read_text())
    side["shapes"]["model.layers.0.w"] = list(reversed(side["shapes"]["model.layers.0.w"]))
    (tmp_path / "hv.json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match="sidecar was edited or corrupted"):
        HarmVector.load(path)


def test_missing_tensor_is_reported(hv, tmp_path):
    path = hv.trim(0.1).save(tmp_path / "hv.safetensors")
    side = json.loads((tmp_path / "hv.json").read_text())
    side["shapes"]["model.layers.9.w"] = [3]
    side["encoding"]["model.layers.9.w"] = "dense"
    _write_consistent(tmp_path / "hv.json", side)
    with pytest.raises(ValueError, match="missing; the file is corrupted"):
        HarmVector.load(path)


def test_wrong_suffix_and_missing_file_are_named(hv, tmp_path):
    with pytest.raises(ValueError, match=r"end in \.safetensors"):
        hv.save(tmp_path / "hv.pt")
    with pytest.raises(FileNotFoundError, match="no such vector file"):
        HarmVector.load(tmp_path / "absent.safetensors")


def test_sparse_indices_outside_the_shape_are_reported(hv, tmp_path):
    path = hv.trim(0.1).save(tmp_path / "hv.safetensors")
    side = json.loads((tmp_path / "hv.json").read_text())
    side["shapes"]["model.layers.0.w"] = [2, 3]  # the stored indices run up to 40·30
    _write_consistent(tmp_path / "hv.json", side)
    with pytest.raises(ValueError, match="fall outside its shape"):
        HarmVector.load(path, sparse=True)


def test_restrict_with_nothing_in_common_is_refused(hv, tmp_path):
    path = hv.save(tmp_path / "hv.safetensors")
    with pytest.raises(ValueError, match="would apply nothing"):
        HarmVector.load(path, target={"transformer.h.0.w": torch.zeros(3)}, restrict=True)


def test_dense_entry_of_another_size_and_unsorted_indices_are_reported(hv, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = hv.save(tmp_path / "hv.safetensors")  # untrimmed: dense entries
    side = json.loads((tmp_path / "hv.json").read_text())
    side["shapes"]["model.layers.0.w"] = [7, 7]
    _write_consistent(tmp_path / "hv.json", side)
    with pytest.raises(ValueError, match="the file is corrupted"):
        HarmVector.load(path)

    path = hv.trim(0.1).save(tmp_path / "sparse.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors["model.layers.0.w.indices"] = tensors["model.layers.0.w.indices"].flip(0).contiguous()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="not strictly increasing"):
        HarmVector.load(path, sparse=True)


@pytest.mark.parametrize("order", [("w", "w.values"), ("w.values", "w")])
def test_a_name_that_collides_with_another_parameters_sparse_key_is_refused(tmp_path, order):
    # "w" stored sparsely is "w.indices" + "w.values": a parameter named "w.values" would overwrite (or be
    # overwritten by) its values, and the file would load without complaint holding wrong numbers.
    w = torch.zeros(100)
    w[3] = 1.0
    tensors = {"w": w, "w.values": torch.tensor([2.0])}
    with pytest.raises(ValueError, match="stored as 'w.values', the key of another parameter"):
        HarmVector({n: tensors[n] for n in order}).save(tmp_path / "v.safetensors")


def test_every_kind_of_vector_save_writes_loads_back(tmp_path):
    # Dense, sparse, a 0-d and an empty tensor, odd characters in names, the empty vector: the sidecar hash
    # checked by load is the one save wrote.
    g = torch.Generator().manual_seed(0)
    d = {'odd "name"/ü✓\\.w': torch.randn(10, 4, generator=g), "zero_d": torch.randn((), generator=g),
         "empty": torch.zeros(0, 3), "model.layers.1.w": torch.randn(50, generator=g)}
    for i, hv in enumerate([HarmVector(d), HarmVector(d).trim(0.1), HarmVector({})]):
        back = HarmVector.load(hv.save(tmp_path / f"v{i}.safetensors"), sparse=True)
        assert set(back) == set(hv) and all(torch.equal(back.dense(n), hv.dense(n)) for n in hv)
