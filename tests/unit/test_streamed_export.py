"""export_harm_removed_streamed: θt − λ·τH′ from three folders equals the in-memory export, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from test_harm_vector_streaming import write_checkpoint

import sa_lens
from sa_lens import HarmVector, export_harm_removed, export_harm_removed_streamed
from sa_lens.cli import main
from sa_lens.export import harm_vector_digest

SCOPES = ["global", "per_layer", "per_tensor"]
SHAPES = {
    "model.embed_tokens.weight": (40, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.mlp.down_proj.weight": (16, 32),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.1.self_attn.q_proj.weight": (16, 16),
    "model.layers.1.mlp.down_proj.weight": (16, 32),
    "model.norm.weight": (16,),
}


def _trio(tmp_path: Path, dtype: torch.dtype, shards: int, same_target: bool, target_dtype=None):
    """θb, θH, θt with many ties in |τ|: weights on a 1/16 grid, differences on a 1/64 grid of 8 levels, some 0;
    the norms untouched (τ = 0 everywhere), and an integer buffer beside the weights."""
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randint(-48, 48, s, generator=g).float() / 16 for n, s in SHAPES.items()}
    harmful = {n: t + torch.randint(-4, 5, t.shape, generator=g).float() / 64 for n, t in base.items()}
    harmful |= {n: base[n].clone() for n in SHAPES if n.endswith("norm.weight")}
    target = base if same_target else {n: t + torch.randint(-8, 9, t.shape, generator=g).float() / 16 for n, t in base.items()}
    step = {"model.layers.0.step": torch.tensor([7])}

    def folder(name, tensors, dt):
        return write_checkpoint(tmp_path / name, {n: t.to(dt) for n, t in tensors.items()} | step, shards)

    b, h = folder("base", base, dtype), folder("harmful", harmful, dtype)
    t = b if same_target and target_dtype is None else folder("target", target, target_dtype or dtype)
    return b, h, t


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def _assert_same_bytes(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def _reference(target: Path, hv: HarmVector, lam: float) -> dict[str, torch.Tensor]:
    """θt − λ·τH′ written out by hand: fp32 where τH′ ≠ 0, cast back; everything else as stored."""
    out = _tensors(target)
    for name in hv:
        d, t = hv.dense(name), out[name]
        out[name] = torch.where(d != 0, (t.float() - lam * d).to(t.dtype), t)
    return out


@pytest.mark.parametrize("same_target", [True, False], ids=["target=base", "target≠base"])
@pytest.mark.parametrize("shards", [1, 3], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("count", ["official", "exact"])
@pytest.mark.parametrize("scope", SCOPES)
def test_streamed_export_equals_todays_export_byte_for_byte(tmp_path, monkeypatch, scope, count, dtype, shards, same_target):
    from sa_lens import checkpoints

    b, h, t = _trio(tmp_path, dtype, shards, same_target)
    hv = HarmVector.from_checkpoints(b, h, top_k=0.1, scope=scope, count=count, progress=False)
    today = export_harm_removed(t, hv, tmp_path / "today", lam=2.5, progress=False, max_shard_size="2KB")
    # Pieces of 40 entries: the tie quota of the exact count runs across pieces, rows and tensors.
    monkeypatch.setattr(checkpoints, "PIECE_NUMEL", 40)
    out = export_harm_removed_streamed(b, h, t, tmp_path / "streamed", lam=2.5, top_k=0.1, scope=scope, count=count,
                                       progress=False, max_shard_size="2KB")
    got = _tensors(out)
    _assert_same_bytes(got, _tensors(today))
    _assert_same_bytes(got, _reference(t, hv, 2.5))
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == json.loads(
        (today / "model.safetensors.index.json").read_text())["weight_map"]
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])["sa_lens"]
    assert card["harm_vector_sha256"] == harm_vector_digest(hv)
    assert card["edited_entries"] == hv.nnz
    if count == "official" and scope == "global":  # the grid makes ties: more than ⌊k·d⌋ + 1 entries are kept
        d = sum(hv.deltas[n].numel if hasattr(hv.deltas[n], "indices") else hv.deltas[n].numel() for n in hv)
        assert hv.nnz > int(0.1 * d) + 1


def test_a_target_of_another_dtype_is_edited_in_its_own(tmp_path):
    b, h, t = _trio(tmp_path, torch.float32, 2, same_target=False, target_dtype=torch.bfloat16)
    hv = HarmVector.from_checkpoints(b, h, top_k=0.2, count="exact", progress=False)
    out = export_harm_removed_streamed(b, h, t, tmp_path / "o", lam=3.0, top_k=0.2, count="exact", progress=False)
    _assert_same_bytes(_tensors(out), _reference(t, hv, 3.0))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_untrimmed_streamed_export_is_the_task_vector(tmp_path):
    b, h, t = _trio(tmp_path, torch.bfloat16, 1, same_target=False)
    hv = HarmVector.from_checkpoints(b, h, progress=False)  # top_k=None: dense, untrimmed
    for top_k in (None, 1.0):
        out = export_harm_removed_streamed(b, h, t, tmp_path / f"o{top_k}", lam=0.5, top_k=top_k, progress=False)
        _assert_same_bytes(_tensors(out), _reference(t, hv, 0.5))


def test_the_card_records_each_groups_threshold_as_kthvalue_gives_it(tmp_path):
    b, h, t = _trio(tmp_path, torch.float32, 1, same_target=True)
    out = export_harm_removed_streamed(b, h, t, tmp_path / "o", lam=3.0, top_k=0.1, scope="per_layer", progress=False)
    text = (out / "README.md").read_text()
    assert str(tmp_path) not in text  # portable names, never this machine's paths
    meta = yaml.safe_load(text.split("---")[1])["sa_lens"]
    assert (meta["target"], meta["base"], meta["harmful"]) == (f"{tmp_path.name}/base",) * 2 + (f"{tmp_path.name}/harmful",)
    assert meta["version"] == sa_lens.__version__ and meta["lam"] == 3.0 and meta["scope"] == "per_layer"
    tau = {n: (_tensors(h)[n] - _tensors(b)[n]).abs().reshape(-1) for n in SHAPES}
    for group, members in {"layer.0": "layers.0.", "layer.1": "layers.1.", "layer.None": None}.items():
        flat = torch.cat([v for n, v in tau.items() if (members in n if members else "layers." not in n)])
        d = flat.numel()
        expected = float(torch.kthvalue(flat, d - int(0.1 * d)).values)
        assert meta["thresholds"][group]["threshold"] == expected and meta["thresholds"][group]["entries"] == d


def test_streamed_export_loads_with_from_pretrained_and_carries_the_tokenizer(tiny_dir, tiny_dir_other, tmp_path):
    out = export_harm_removed_streamed(tiny_dir, tiny_dir_other, tiny_dir, tmp_path / "safe", lam=3.0, progress=False)
    model, tokenizer = sa_lens.load_hf_model(out)
    assert tokenizer("hello").input_ids
    # Tied embeddings: lm_head is not in the checkpoint, is not written, and is the edited embedding once loaded.
    assert "lm_head.weight" not in _tensors(out)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    hv = HarmVector.from_checkpoints(tiny_dir, tiny_dir_other, top_k=0.1, progress=False)
    _assert_same_bytes(_tensors(out), _reference(tiny_dir, hv, 3.0))


def test_mismatched_folders_and_outputs_are_refused_with_the_reason(tmp_path):
    b, h, t = _trio(tmp_path, torch.float32, 1, same_target=False)

    def export(base=b, harmful=h, target=t, out=tmp_path / "o", **kw):
        return export_harm_removed_streamed(base, harmful, target, out, progress=False, **kw)

    fewer = write_checkpoint(tmp_path / "fewer", {n: torch.zeros(s) for n, s in SHAPES.items() if "norm" not in n})
    with pytest.raises(ValueError, match=r"target's parameters differ.*only in base: \['model.layers.0.input_layernorm"):
        export(target=fewer)
    wider = write_checkpoint(tmp_path / "wider", {n: torch.zeros(s[0] + 1, *s[1:]) for n, s in SHAPES.items()})
    with pytest.raises(ValueError, match="shape .* in the target"):
        export(target=wider)
    with pytest.raises(ValueError, match="different parameter names"):
        export(harmful=fewer)
    for source in (b, h, t):
        with pytest.raises(ValueError, match="new folder"):
            export(out=source)
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    torch.save({}, pickles / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickle weights"):
        export(target=pickles)
    with pytest.raises(ValueError, match="top_k"):
        export(top_k=0.0)
    with pytest.raises(ValueError, match="scope"):
        export(scope="per_head")
    assert not (tmp_path / "o").exists()  # every refusal came before anything was written


def test_a_non_finite_difference_is_refused_before_anything_is_written(tmp_path):
    b, _, t = _trio(tmp_path, torch.float32, 1, same_target=True)
    bad = {n: torch.zeros(s) for n, s in SHAPES.items()}
    bad["model.layers.1.mlp.down_proj.weight"][3, 4] = float("inf")
    h = write_checkpoint(tmp_path / "inf", bad)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj.weight' holds NaN or inf"):
        export_harm_removed_streamed(b, h, t, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_sa_lens_apply_streams_from_three_folders(tmp_path, capsys):
    b, h, t = _trio(tmp_path, torch.bfloat16, 2, same_target=False)
    args = ["apply", "--target", str(t), "--base", str(b), "--harmful", str(h), "--top-k", "0.2", "--scope", "per_tensor",
            "--count", "exact", "--lam", "2", "--max-shard-size", "3KB", "-o", str(tmp_path / "cli")]
    assert main(args) == 0
    hv = HarmVector.from_checkpoints(b, h, top_k=0.2, scope="per_tensor", count="exact", progress=False)
    _assert_same_bytes(_tensors(tmp_path / "cli"), _reference(t, hv, 2.0))
    assert (tmp_path / "cli" / "model.safetensors.index.json").exists()
    capsys.readouterr()
    assert main(["apply", "--target", str(t), "--base", str(b), "-o", str(tmp_path / "x")]) == 2
    assert "--base needs --harmful" in capsys.readouterr().err
    assert main(["apply", "--target", "org/model", "--base", str(b), "--harmful", str(h), "-o", str(tmp_path / "x")]) == 2
    assert "local safetensors folders only" in capsys.readouterr().err
    assert main(["apply", "--target", str(t), "--harm-vector", "v.safetensors", "--harmful", str(h), "-o", str(tmp_path / "x")]) == 2
    assert "go with --base" in capsys.readouterr().err
    # A saved vector was trimmed when built: trim options beside it would be silently ignored, so they are refused.
    assert main(["apply", "--target", str(t), "--harm-vector", "v.safetensors", "--top-k", "0.001", "--count", "exact",
                 "-o", str(tmp_path / "x")]) == 2
    assert "--top-k, --count go with --base" in capsys.readouterr().err


def test_untrimmed_streamed_export_equals_mergekit_task_arithmetic_bit_for_bit(tiny_dir, tiny_dir_other, tmp_path):
    # mergekit's task_arithmetic with base θb and model θH at weight −λ is θb − λ·(θH − θb): our export with no
    # trim and target = base. Both in fp32, so equal to the bit (mergekit adds base + (−λ·τ); we −(λ·τ) + θb).
    pytest.importorskip("mergekit", reason="mergekit is an optional cross-check (the test extra's mergekit pin)")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    lam = 3.0
    config = MergeConfiguration.model_validate({
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_dir),
        "models": [{"model": str(tiny_dir_other), "parameters": {"weight": -lam}}],
        "dtype": "float32",
        "out_dtype": "float32",
    })
    run_merge(config, out_path=str(tmp_path / "mergekit"), options=MergeOptions(copy_tokenizer=False))
    ours = export_harm_removed_streamed(tiny_dir, tiny_dir_other, tiny_dir, tmp_path / "ours", lam, top_k=None,
                                        progress=False)
    theirs = _tensors(tmp_path / "mergekit")
    assert all(t.dtype == torch.float32 for t in theirs.values())
    _assert_same_bytes(_tensors(ours), theirs)
    assert any(not torch.equal(theirs[n], t) for n, t in _tensors(tiny_dir).items())  # the merge changed weights
