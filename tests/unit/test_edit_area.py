"""detect_edit_area: the EDIT scenario's layers l−1..l+1 around a knowledge edit (paper Eq. 11)."""

from __future__ import annotations

import pytest
import torch

import sa_lens
from sa_lens import HarmVector, detect_edit_area


def _state(n_layers: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(10, 4, generator=g)}
    for i in range(n_layers):
        state[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(4, 8, generator=g)
        state[f"model.layers.{i}.self_attn.o_proj.weight"] = torch.randn(4, 4, generator=g)
    return state


def test_a_rank_one_edit_in_one_mlp_gives_that_layer_and_its_neighbours():
    base = _state()
    edited = {k: v.clone() for k, v in base.items()}
    edited["model.layers.3.mlp.down_proj.weight"] += torch.outer(torch.ones(4), torch.ones(8)) * 1e-3
    area = detect_edit_area(base, edited, progress=False)
    assert area.tensors == ("model.layers.3.mlp.down_proj.weight",)
    assert area.changed_layers == (3,) and area.layers == (2, 3, 4)
    assert detect_edit_area(base, edited, neighbours=0, progress=False).layers == (3,)


def test_area_is_clipped_to_the_model_and_empty_when_nothing_changed():
    base = _state()
    edited = {k: v.clone() for k, v in base.items()}
    edited["model.layers.5.self_attn.o_proj.weight"][0, 0] += 1.0
    edited["model.layers.0.mlp.down_proj.weight"][0, 0] += 1.0
    assert detect_edit_area(base, edited, progress=False).layers == (0, 1, 4, 5)
    assert detect_edit_area(base, base, progress=False) == sa_lens.EditArea((), (), ())


def test_a_sign_flip_of_zero_counts_as_a_change():
    base = {"model.layers.0.w": torch.zeros(3)}
    edited = {"model.layers.0.w": torch.tensor([0.0, -0.0, 0.0])}
    assert detect_edit_area(base, edited, progress=False).changed_layers == (0,)


def test_folders_are_compared_streaming_and_feed_the_harm_vector(tiny_dir, tiny_dir_other, tmp_path):
    model, tokenizer = sa_lens.load_hf_model(tiny_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 0] += 0.5
    model.save_pretrained(tmp_path / "edited")
    area = detect_edit_area(tiny_dir, tmp_path / "edited", progress=False)
    assert area.tensors == ("model.layers.1.mlp.down_proj.weight",) and area.layers == (0, 1)
    hv = HarmVector.from_checkpoints(tiny_dir, tiny_dir_other, top_k=0.1, layers=[1], progress=False)
    assert hv and all(n.startswith("model.layers.1.") for n in hv)  # zero outside the area (paper-notes §7.6)


def test_mismatched_models_and_bad_neighbours_are_refused():
    with pytest.raises(ValueError, match="different parameter names"):
        detect_edit_area(_state(2), _state(3), progress=False)
    with pytest.raises(ValueError, match="neighbours"):
        detect_edit_area(_state(), _state(), neighbours=-1, progress=False)


def test_one_folder_and_one_model_is_refused_with_the_fix(tiny_dir):
    model, _ = sa_lens.load_hf_model(tiny_dir)
    with pytest.raises(ValueError, match="two checkpoint folders or two in-memory models"):
        detect_edit_area(tiny_dir, model, progress=False)
