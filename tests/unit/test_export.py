"""export_harm_removed: the written folder loads with from_pretrained and holds θt − λ·τH′."""

from __future__ import annotations

import pytest
import torch

import sa_lens
from sa_lens import HarmVector, checkpoint_parameters, export_harm_removed


@pytest.fixture()
def hv(tiny_dir, tiny_dir_other) -> HarmVector:
    return HarmVector.from_checkpoints(tiny_dir, tiny_dir_other, top_k=0.1, progress=False)


def _expected(target, hv: HarmVector, lam: float) -> dict[str, torch.Tensor]:
    params = checkpoint_parameters(target)
    return {
        n: torch.where(hv.dense(n) != 0, (p.detach().float() - lam * hv.dense(n)).to(p.dtype), p.detach())
        for n, p in params.items()
    }


def _assert_holds(folder, expected: dict[str, torch.Tensor], dtype=torch.float32) -> None:
    exported, tokenizer = sa_lens.load_hf_model(folder, dtype=dtype)  # the tokenizer files came along too
    assert tokenizer("hello").input_ids
    got = checkpoint_parameters(exported)
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name


def test_folder_export_streams_shards_and_loads_with_from_pretrained(tiny_dir, hv, tmp_path):
    out = export_harm_removed(tiny_dir, hv, tmp_path / "safe", lam=3.0, progress=False)
    base, _ = sa_lens.load_hf_model(tiny_dir)
    _assert_holds(out, _expected(base, hv, 3.0))


def test_sharded_folder_export_writes_mergekit_shard_names_and_an_index_with_total_size(tiny_dir, hv, tmp_path):
    import json

    from safetensors import safe_open

    model, tokenizer = sa_lens.load_hf_model(tiny_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    tokenizer.save_pretrained(tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    out = export_harm_removed(tmp_path / "sharded", hv, tmp_path / "safe", lam=2.0, progress=False, max_shard_size="50KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert all(index["weight_map"][k] == shard for k in f.keys())
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
            total += sum(sizes)
            assert sum(sizes) <= 50_000 or len(sizes) == 1  # a shard past the limit holds one tensor alone
    assert index["metadata"]["total_size"] == total
    _assert_holds(out, _expected(model, hv, 2.0))


def test_folder_export_records_the_dtype_and_a_portable_provenance_card(tiny_dir, hv, tmp_path):
    import json

    import yaml

    from sa_lens.export import harm_vector_digest

    model, tokenizer = sa_lens.load_hf_model(tiny_dir, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    out = export_harm_removed(tmp_path / "bf16", hv, tmp_path / "safe", lam=2.0, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and str(tiny_dir) not in card  # portable names only
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == f"{tmp_path.name}/bf16"
    meta = front["sa_lens"]
    assert meta["lam"] == 2.0 and meta["top_k"] == 0.1 and meta["scope"] == "global" and meta["count"] == "official"
    assert meta["harm_vector_sha256"] == harm_vector_digest(hv) and meta["version"] == sa_lens.__version__
    assert meta["base"].endswith("/model") and not meta["base"].startswith("/")
    _assert_holds(out, _expected(model, hv, 2.0), torch.bfloat16)


def test_a_stored_tied_lm_head_is_written_once_as_the_edited_embedding(tiny_dir, hv, tmp_path):
    # Older exports of tied models still store lm_head.weight; writing it would leave an unedited second copy.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = tmp_path / "stored_head"
    src.mkdir()
    for f in tiny_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    state = load_file(tiny_dir / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = export_harm_removed(src, hv, tmp_path / "safe", lam=3.0, progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    base, _ = sa_lens.load_hf_model(tiny_dir)
    _assert_holds(out, _expected(base, hv, 3.0))


def test_harm_vector_digest_does_not_depend_on_the_form_it_is_held_in(hv):
    from sa_lens.export import harm_vector_digest

    dense = HarmVector({n: hv.dense(n) for n in hv}, hv.meta)
    assert harm_vector_digest(dense) == harm_vector_digest(hv)
    name = next(n for n in hv if hv.sparse(n).nnz)
    changed = dict(dense.deltas)
    changed[name] = changed[name].clone()
    changed[name].view(-1)[hv.sparse(name).indices[0]] *= 2
    assert harm_vector_digest(HarmVector(changed)) != harm_vector_digest(hv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_export_saves_the_edit_and_leaves_the_model_as_it_was(tiny_dir, hv, tmp_path, dtype):
    model, tokenizer = sa_lens.load_hf_model(tiny_dir, dtype=dtype)
    before = {n: p.detach().clone() for n, p in checkpoint_parameters(model).items()}
    expected = _expected(model, hv, 3.0)
    out = export_harm_removed(model, hv, tmp_path / "safe", lam=3.0, tokenizer=tokenizer)
    _assert_holds(out, expected, dtype)
    for n, p in checkpoint_parameters(model).items():
        assert torch.equal(p.detach().view(torch.uint8), before[n].view(torch.uint8)), n


def test_export_refuses_a_foreign_vector_a_state_dict_and_the_target_folder(tiny_dir, hv, tmp_path):
    with pytest.raises(ValueError, match="the target lacks"):
        export_harm_removed(tiny_dir, HarmVector({"transformer.h.0.w": torch.ones(2)}), tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="state dict"):
        export_harm_removed({"w": torch.zeros(2)}, HarmVector({"w": torch.ones(2)}), tmp_path / "o")
    with pytest.raises(ValueError, match="new folder"):
        export_harm_removed(tiny_dir, hv, tiny_dir, progress=False)
    with pytest.raises(ValueError, match="finite"):
        export_harm_removed(tiny_dir, hv, tmp_path / "o", lam=float("nan"), progress=False)
    export_harm_removed(tiny_dir, hv, tmp_path / "done", progress=False)
    with pytest.raises(ValueError, match="already holds weights"):  # a second export would mix its shards in
        export_harm_removed(tiny_dir, hv, tmp_path / "done", progress=False)
    with pytest.raises(ValueError, match="max_shard_size"):
        export_harm_removed(tiny_dir, hv, tmp_path / "o2", progress=False, max_shard_size="five gigs")


def test_folder_export_writes_every_shard_and_no_stale_pickle_weights(tiny_dir, hv, tmp_path):
    import json
    import shutil

    from safetensors.torch import save_file

    model, tokenizer = sa_lens.load_hf_model(tiny_dir)
    src = tmp_path / "sharded"
    model.save_pretrained(src, max_shard_size="40KB")
    tokenizer.save_pretrained(src)
    # A shard that holds only an integer buffer (nothing to edit), and the unedited weights as a pickle too.
    save_file({"model.step": torch.zeros(1, dtype=torch.int64)}, str(src / "buffers.safetensors"))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.step"] = "buffers.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.save({}, src / "pytorch_model.bin")
    shutil.copy(src / "model.safetensors.index.json", src / "pytorch_model.bin.index.json")

    out = export_harm_removed(src, hv, tmp_path / "safe", lam=3.0, progress=False, max_shard_size="40KB")
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert all((out / s).exists() for s in set(weight_map.values()))
    from safetensors.torch import load_file

    assert torch.equal(load_file(out / weight_map["model.step"])["model.step"], torch.zeros(1, dtype=torch.int64))
    assert not (out / "pytorch_model.bin").exists() and not (out / "pytorch_model.bin.index.json").exists()


def test_bridge_export_writes_each_checkpoint_tensor_once_and_restores_the_bridge(tiny_dir, tiny_bridge, hv, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    before = {n: p.detach().clone() for n, p in checkpoint_parameters(tiny_bridge).items()}
    expected = _expected(tiny_bridge, hv, 3.0)
    out = export_harm_removed(tiny_bridge, hv, tmp_path / "safe", lam=3.0)  # tied embeddings, aliased in the bridge
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as src, safe_open(str(out / "model.safetensors"), "pt") as dst:
        assert set(dst.keys()) == set(src.keys())
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.get_output_embeddings().weight is exported.get_input_embeddings().weight
    got = checkpoint_parameters(exported)
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name
    for n, p in checkpoint_parameters(tiny_bridge).items():
        assert torch.equal(p.detach().view(torch.uint8), before[n].view(torch.uint8)), n


def test_a_bridge_export_carries_the_checkpoints_own_tokenizer(tiny_dir, tiny_bridge, hv, tmp_path):
    # TransformerLens's copy of the tokenizer adds a BOS this checkpoint never adds; the export must not inherit it.
    from sa_lens.prompts import format_prompts, token_ids

    out = export_harm_removed(tiny_bridge, hv, tmp_path / "safe", lam=3.0)
    _, own = sa_lens.load_hf_model(tiny_dir)
    _, exported = sa_lens.load_hf_model(out)
    texts = format_prompts(own, ["How do I bake bread?"], chat_template=False)
    assert exported(texts)["input_ids"] == own(texts)["input_ids"] == token_ids(tiny_bridge.tokenizer, texts)
    assert exported.chat_template == own.chat_template


def test_a_folder_without_tokenizer_files_is_refused_with_the_fix(tiny_dir, hv, tmp_path):
    model, _ = sa_lens.load_hf_model(tiny_dir)
    out = export_harm_removed(model, hv, tmp_path / "safe", lam=3.0)  # no tokenizer= given
    for load in (sa_lens.load_model, sa_lens.load_hf_model):
        with pytest.raises(FileNotFoundError, match=r"no tokenizer files.*tokenizer.save_pretrained"):
            load(out)
