"""τH per layer / head / MLP: GQA slicing, mass bookkeeping, ΔW_O alignment and rank agreement."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import sa_lens
from sa_lens.analysis.weights import head_mass, layer_mass, o_alignment, rank_agreement
from sa_lens.harm_vector import HarmVector
from sa_lens.sparse_delta import SparseDelta

N_HEADS, N_KV, D_HEAD, D_MODEL = 4, 2, 3, 12


def _hv(**nonzero) -> HarmVector:
    """A 2-layer Llama-shaped vector, zero except the given ``{name: (index, value)}`` entries."""
    shapes = {"q": (N_HEADS * D_HEAD, D_MODEL), "k": (N_KV * D_HEAD, D_MODEL), "v": (N_KV * D_HEAD, D_MODEL),
              "o": (D_MODEL, N_HEADS * D_HEAD)}
    deltas = {"model.embed_tokens.weight": torch.zeros(5, D_MODEL)}
    for layer in range(2):
        for mat, shape in shapes.items():
            deltas[f"model.layers.{layer}.self_attn.{mat}_proj.weight"] = torch.zeros(shape)
        for mat, shape in (("gate", (8, D_MODEL)), ("up", (8, D_MODEL)), ("down", (D_MODEL, 8))):
            deltas[f"model.layers.{layer}.mlp.{mat}_proj.weight"] = torch.zeros(shape)
    for key, (index, value) in nonzero.items():
        layer, mat = key.split("_")
        deltas[f"model.layers.{layer[1:]}.self_attn.{mat}_proj.weight" if mat in "qkvo" else
               f"model.layers.{layer[1:]}.mlp.{mat}_proj.weight"][index] = value
    return HarmVector(deltas)


def test_k_and_v_rows_belong_to_the_kv_head_of_each_query_group():
    # Row 4 of k_proj is KV head 1 (rows 3..5), shared by query heads 2 and 3.
    df = head_mass(_hv(L1_k=((4, 0), 2.0)), N_HEADS, N_KV, top_k=1.0)
    k = df[(df.matrix == "k") & (df.layer == 1)].set_index("head")["l2sq"]
    assert k.to_dict() == {0: 0.0, 1: 0.0, 2: 4.0, 3: 4.0}
    total = df[(df.matrix == "total") & (df.layer == 1)].set_index("head")["l2sq"]
    assert total.sum() == pytest.approx(4.0)  # the shared KV mass is split over its group, not counted twice


def test_o_proj_columns_and_q_proj_rows_select_the_head():
    df = head_mass(_hv(L0_o=((0, 7), 3.0), L0_q=((2, 0), -1.0)), N_HEADS, N_KV, top_k=1.0)
    o = df[(df.matrix == "o") & (df.layer == 0)].set_index("head")
    q = df[(df.matrix == "q") & (df.layer == 0)].set_index("head")
    assert o.loc[2, "l1"] == 3.0 and o["l1"].sum() == 3.0  # column 7 is in head 7 // 3 = 2
    assert q.loc[0, "l1"] == 1.0 and q["l1"].sum() == 1.0


def test_layer_mass_shares_add_up_and_topk_share_follows_the_trim():
    hv = _hv(L0_o=((0, 0), 3.0), L1_down=((1, 1), 4.0), L1_q=((0, 0), 0.1))
    # The official threshold is the (d − ⌊k·d⌋)-th smallest |τ|, kept inclusively: ⌊k·d⌋ = 1 keeps the top two.
    df = layer_mass(hv, top_k=1.5 / hv.numel)
    assert df["l2sq_share"].sum() == pytest.approx(1.0)
    assert df["topk_share"].sum() == pytest.approx(1.0)
    by = df.set_index(["layer", "kind"])
    assert by.loc[(1, "mlp"), "topk_share"] == pytest.approx(0.5)
    assert by.loc[(1, "attention"), "topk_share"] == 0.0  # 0.1 is not in the top 2


def test_o_alignment_is_one_along_the_direction_and_near_baseline_for_noise():
    direction = torch.zeros(D_MODEL)
    direction[5] = 2.0
    hv = _hv(L0_o=((5, slice(0, 3)), 1.0))  # head 0 of layer 0 writes only along e5
    df = o_alignment(hv, direction, N_HEADS).set_index(["layer", "head"])
    assert df.loc[(0, 0), "alignment"] == pytest.approx(1.0)
    assert df.loc[(0, 1), "alignment"] == 0.0  # no change at all
    torch.manual_seed(0)
    big = torch.randn(2048, 64)
    noise = o_alignment(HarmVector({"model.layers.0.self_attn.o_proj.weight": big}), torch.randn(2048), 1)
    assert noise.loc[0, "alignment"] == pytest.approx(1 / math.sqrt(2048), rel=0.3)


def test_o_alignment_delta_write_is_signed():
    direction = torch.zeros(D_MODEL)
    direction[5] = 1.0
    hv = _hv(L0_o=((5, 0), 1.0))
    mean_z = torch.zeros(2, N_HEADS, D_HEAD)
    mean_z[0, 0, 0] = -2.0
    df = o_alignment(hv, direction, N_HEADS, mean_z=mean_z)
    assert df.loc[0, "delta_write"] == pytest.approx(-2.0)


def test_rank_agreement_detects_monotone_and_reversed_rankings():
    a = pd.Series(range(20), dtype=float)
    assert rank_agreement(a, a**3)["rho"] == pytest.approx(1.0)
    rev = rank_agreement(a, -a)
    assert rev["rho"] == pytest.approx(-1.0) and rev["p_value"] < 0.01 and rev["n"] == 20
    noise = rank_agreement(a, pd.Series(torch.randn(20, generator=torch.Generator().manual_seed(1)).numpy()))
    assert noise["p_value"] > 0.01
    with pytest.raises(ValueError, match="at least 3"):
        rank_agreement(a[:2], a[:2])


def test_within_group_agreement_ignores_differences_between_groups():
    # Between layers both measures grow (ρ high overall); within each layer they are reversed.
    index = pd.MultiIndex.from_product([range(6), range(5)], names=["layer", "head"])
    layer = pd.Series(index.get_level_values("layer"), index=index)
    head = pd.Series(index.get_level_values("head"), index=index)
    a = 10.0 * layer + head
    b = 10.0 * layer - head
    assert rank_agreement(a, b, n_permutations=500)["rho"] > 0.8
    within = rank_agreement(a, b, n_permutations=500, groups=layer)
    assert within["rho"] == pytest.approx(-1.0) and within["p_value"] < 0.01


@pytest.fixture(scope="module")
def forms(tiny_dir, tiny_dir_other, tmp_path_factory) -> dict[str, list[HarmVector]]:
    """The tiny model's τH, untrimmed and trimmed to its top 10 %, each in every form a harm vector takes."""
    base, _ = sa_lens.load_hf_model(tiny_dir)
    harmful, _ = sa_lens.load_hf_model(tiny_dir_other)
    full = HarmVector.from_models(base, harmful)
    streamed = HarmVector.from_checkpoints(tiny_dir, tiny_dir_other, top_k=0.1, progress=False)
    assert any(isinstance(t, SparseDelta) for _, t in streamed.items())
    path = streamed.save(tmp_path_factory.mktemp("hv") / "hv.safetensors")
    trimmed = full.trim(0.1)
    return {
        "untrimmed": [full, HarmVector.from_checkpoints(tiny_dir, tiny_dir_other, progress=False)],
        "trimmed": [trimmed, streamed, HarmVector.load(path, sparse=True), HarmVector.load(path),
                    HarmVector({n: trimmed.sparse(n) for n in trimmed})],
    }


ANALYSES = {
    "layer_mass": lambda hv: layer_mass(hv, top_k=0.05),
    "head_mass": lambda hv: head_mass(hv, n_heads=4, n_kv_heads=2, top_k=0.05),
    "o_alignment": lambda hv: o_alignment(hv, torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), 4,
                                          mean_z=torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1))),
}


@pytest.mark.parametrize("analysis", ANALYSES)
@pytest.mark.parametrize("trim", ["untrimmed", "trimmed"])
def test_every_form_of_one_harm_vector_gives_the_same_frame(forms, analysis, trim):
    reference, *others = (ANALYSES[analysis](hv) for hv in forms[trim])
    assert reference["l2sq" if "mass" in analysis else "delta_o_norm"].sum() > 0
    for other in others:
        pd.testing.assert_frame_equal(other, reference, check_exact=True)


def test_layer_mass_of_a_trimmed_vector_holds_only_the_kept_mass(forms):
    full, trimmed = forms["untrimmed"][0], forms["trimmed"][1]
    mass = layer_mass(trimmed, top_k=1.0)
    assert mass["l2sq"].sum() == pytest.approx(sum(float(trimmed.dense(n).double().pow(2).sum()) for n in trimmed))
    assert mass["l2sq"].sum() < layer_mass(full)["l2sq"].sum()
    assert set(mass["kind"]) == {"attention", "mlp", "embeddings", "norms"}
    assert mass["topk_share"].sum() == pytest.approx(1.0)


def test_head_mass_refuses_interleaved_or_incomplete_projections():
    interleaved = HarmVector({"gpt_neox.layers.0.attention.query_key_value.weight": torch.ones(12, 4)})
    with pytest.raises(ValueError, match="interleaved per head"):
        head_mass(interleaved, n_heads=2)
    with pytest.raises(ValueError, match=r"lacks its \['o'\]"):  # GPT-2's fused c_attn without its c_proj
        head_mass(HarmVector({"transformer.h.0.attn.c_attn.weight": torch.ones(4, 12)}), n_heads=2)
    with pytest.raises(ValueError, match=r"lacks its \['k', 'q', 'v'\]"):
        head_mass(HarmVector({"model.layers.0.self_attn.o_proj.weight": torch.ones(4, 4)}), n_heads=2)
    with pytest.raises(ValueError, match="do not split into 4 heads"):
        head_mass(_hv(), n_heads=4, n_kv_heads=4)
