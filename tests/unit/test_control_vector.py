"""A safety vector as a llama.cpp control vector: the GGUF layout llama.cpp reads, the layer map, the refusals,
and the check that matters: adding ``direction.N`` to block N's output, as llama.cpp does, steers a plain
Hugging Face model exactly as ``SafeAlign(formula="add")`` steers the bridge.

repeng (whose loader would be a second reader) is not installed here; the layout checks follow llama.cpp's
``common_control_vector_load_one`` instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from conftest import build_tiny_model_dir
from transformers import LlamaForCausalLM

import sa_lens
from sa_lens import SafetyVector, cli
from sa_lens.control_vector import control_vectors, from_gguf, to_gguf
from sa_lens.errors import InputError
from sa_lens.interventions import SafeAlign
from sa_lens.provenance import model_name

N_LAYERS = 3
IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 17]])


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory: pytest.TempPathFactory):
    """A 3-layer tiny Llama as a bridge and as a plain Hugging Face model, and a random ICV for it."""
    path = build_tiny_model_dir(tmp_path_factory.mktemp("cv") / "model", n_layers=N_LAYERS)
    bridge = sa_lens.load_model(path)
    hf = LlamaForCausalLM.from_pretrained(path).eval()
    directions = torch.randn(N_LAYERS, bridge.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 3
    sv = SafetyVector(directions, {"model": model_name(bridge), "processing": "raw", "sign": "unsafe_minus_safe"})
    return bridge, hf, sv


def _vector(rows: dict[int, float] | None = None, d_model: int = 8) -> SafetyVector:
    """Rows ``l`` filled with ``value`` (all rows 1..n-1 by default), the others zero."""
    directions = torch.zeros(N_LAYERS, d_model)
    for layer, value in (rows or {1: 1.0, 2: 2.0}).items():
        directions[layer] = value * torch.arange(1, d_model + 1, dtype=torch.float32)
    return SafetyVector(directions, {"model": "tiny/model"})


def _llama_cpp_logits(hf: LlamaForCausalLM, vectors: dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits with ``vectors[N]`` added to the output of decoder block N at every position (llama.cpp's
    ``build_cvec(cur, il)``), by plain torch forward hooks on the Hugging Face model."""

    def add(w: torch.Tensor):
        def hook(module, inputs, output):
            if isinstance(output, tuple):
                return (output[0] + w, *output[1:])
            return output + w

        return hook

    handles = [hf.model.layers[n].register_forward_hook(add(w)) for n, w in vectors.items()]
    try:
        with torch.no_grad():
            return hf(IDS).logits
    finally:
        for h in handles:
            h.remove()


def test_gguf_has_llama_cpp_layout_and_minus_alpha_v_at_each_block(tmp_path):
    sv = _vector()
    path = to_gguf(sv, tmp_path / "sv.gguf", 0.5, site="resid_post", formula="add", per_layer_alpha={2: 0.25},
                   model_type="llama")
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "llama"
    assert fields["controlvector.layer_count"] == 2
    assert reader.fields["controlvector.layer_count"].types == [gguf.GGUFValueType.UINT32]
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.2"]
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [8]
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    torch.testing.assert_close(tensors["direction.1"], -0.5 * sv.directions[1], rtol=0, atol=0)
    torch.testing.assert_close(tensors["direction.2"], -0.25 * sv.directions[2], rtol=0, atol=0)
    assert fields["sa_lens.site"] == "resid_post" and fields["sa_lens.formula"] == "add"
    assert float(fields["sa_lens.alpha"]) == 0.5 and json.loads(fields["sa_lens.per_layer_alpha"]) == {"2": 0.25}
    assert json.loads(fields["sa_lens.source_layers"]) == {"1": 1, "2": 2}
    assert fields["sa_lens.source_model"] == "tiny/model"
    read = from_gguf(path)
    assert list(read) == [1, 2]
    torch.testing.assert_close(read[1], tensors["direction.1"], rtol=0, atol=0)


def test_resid_pre_of_layer_l_is_the_output_of_block_l_minus_1():
    vectors = control_vectors(_vector({2: 1.0}), 1.0, site="resid_pre", formula="add")
    assert list(vectors) == [1]
    torch.testing.assert_close(vectors[1], -_vector({2: 1.0}).directions[2])


def test_zero_rows_are_left_out_and_a_zero_layer_0_row_is_no_error():
    vectors = control_vectors(_vector({1: 1.0}), 2.0, site="mlp_out", formula="add", model_type="qwen2")
    assert list(vectors) == [1]
    assert list(control_vectors(_vector(), 1.0, site="resid_post", formula="add", per_layer_alpha={2: 0.0})) == [1]


@pytest.mark.parametrize(
    "site, layers",
    [("resid_post", (1, 2)), ("mlp_out", (1, 2)), ("resid_pre", (2,))],
)
def test_file_added_at_block_outputs_gives_safe_align_add_logits(tiny3, tmp_path, site, layers):
    bridge, hf, sv = tiny3
    path = sv.to_gguf(tmp_path / "sv.gguf", 0.7, site=site, formula="add", layers=layers,
                      per_layer_alpha={layers[-1]: 0.4}, model_type="llama")
    with torch.no_grad(), SafeAlign(vector=sv, alpha=0.7, site=site, formula="add", layers=layers,
                                    per_layer_alpha={layers[-1]: 0.4}).apply(bridge):
        expected = bridge(IDS)
    got = _llama_cpp_logits(hf, from_gguf(path))
    torch.testing.assert_close(got, expected)
    unsteered = _llama_cpp_logits(hf, {})
    assert (got - unsteered).abs().max() > 0.1  # the vector does steer: the equality above is not vacuous


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(formula="official"), "formula=.official. cannot"),
        (dict(formula="ablate"), "removes a different amount"),
        (dict(positions="prompt"), "every position"),
        (dict(positions="generated"), "every position"),
        (dict(site="attn_out"), "block outputs"),
        (dict(site="mlp_out"), "does not record the architecture"),
        (dict(site="mlp_out", model_type="gemma2"), "post_feedforward_layernorm"),
        (dict(site="mlp_out", model_type="gemma3_text", assume_additive_mlp=True), "post_feedforward_layernorm"),
        (dict(site="mlp_out", model_type="mamba"), "assume_additive_mlp=True"),
        (dict(layers=(0, 1)), "output of block 0"),
        (dict(site="resid_pre", layers=(0,)), "the embeddings"),
        (dict(site="resid_pre", layers=(1, 2)), "Export layers 2..2"),
        (dict(layers=(3,)), "outside the safety vector"),
        (dict(per_layer_alpha={1: 0.0, 2: 0.0}, layers=(1, 2)), "Nothing to export"),
        (dict(alpha=float("nan")), "finite"),
        (dict(alpha=1e39), "Layer 1: α·v = 1e\\+39·v overflows float32"),
        (dict(per_layer_alpha={2: 1e39}), "Layer 2: .* overflows float32"),
        (dict(per_layer_alpha={"1": 2.0}), "per_layer_alpha keys must be integer layer indices"),
        (dict(layers=(1.0, 2)), "layers must be integer layer indices"),
        (dict(per_layer_alpha={0: 2.0}), "per_layer_alpha names layers \\[0\\] that are not exported"),
    ],
)
def test_what_llama_cpp_cannot_reproduce_is_refused_and_nothing_written(tmp_path, options, match):
    sv = _vector({0: 1.0, 1: 1.0, 2: 1.0})
    options = {"site": "resid_post", "formula": "add", "alpha": 1.0, "layers": (1, 2)} | options
    path = tmp_path / "sv.gguf"
    with pytest.raises(InputError, match=match):
        to_gguf(sv, path, options.pop("alpha"), **options)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_mlp_out_of_an_unlisted_type_is_exported_on_the_callers_word():
    vectors = control_vectors(_vector(), 1.0, site="mlp_out", formula="add", model_type="mamba",
                              assume_additive_mlp=True)
    assert list(vectors) == [1, 2]


def test_a_vector_read_from_folded_weights_is_refused():
    sv = SafetyVector(_vector().directions, {"processing": "processed"})
    with pytest.raises(InputError, match="folded and centred"):
        control_vectors(sv, 1.0, site="resid_post", formula="add")


def _write_raw(path: Path, arch: str, tensors: dict[str, torch.Tensor]) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for name, t in tensors.items():
        writer.add_tensor(name, t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "arch, tensors, match",
    [
        ("llama", {"direction.1": torch.ones(4)}, "not 'controlvector'"),
        ("controlvector", {"direction.0": torch.ones(4)}, "N ≥ 1"),
        ("controlvector", {"direction.1": torch.ones(4, dtype=torch.float16)}, "float32"),
        ("controlvector", {"direction.1": torch.ones(4), "direction.2": torch.ones(5)}, "different widths"),
        ("controlvector", {"direction.01": torch.ones(4), "direction.1": torch.ones(4)},
         "'direction.01' and 'direction.1' both name block 1"),
        ("controlvector", {}, "no direction.N tensors"),
    ],
)
def test_reader_refuses_what_llama_cpp_rejects(tmp_path, arch, tensors, match):
    with pytest.raises(InputError, match=match):
        from_gguf(_write_raw(tmp_path / "x.gguf", arch, tensors))


@pytest.mark.parametrize("damage", ["half", "header", "garbage"])
def test_reader_refuses_a_truncated_or_non_gguf_file_by_name(tmp_path, damage):
    good = to_gguf(_vector(), tmp_path / "good.gguf", 1.0, site="resid_post", formula="add", layers=(1, 2))
    data = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes({"half": data[: len(data) // 2], "header": data[:20], "garbage": b"hello world" * 3}[damage])
    with pytest.raises(InputError, match="bad.gguf: not a readable GGUF file"):
        from_gguf(bad)


def test_an_existing_file_is_replaced_only_with_overwrite(tmp_path):
    path = tmp_path / "sv.gguf"
    path.write_text("precious")
    with pytest.raises(InputError, match="sv.gguf exists; pass overwrite=True"):
        to_gguf(_vector(), path, 1.0, site="resid_post", formula="add", layers=(1, 2))
    assert path.read_text() == "precious"
    to_gguf(_vector(), path, 1.0, site="resid_post", formula="add", layers=(1, 2), overwrite=True)
    assert list(from_gguf(path)) == [1, 2]
    with pytest.raises(InputError, match="is a folder"):
        to_gguf(_vector(), tmp_path, 1.0, site="resid_post", formula="add", layers=(1, 2), overwrite=True)


def test_cli_refuses_an_existing_output_unless_overwrite(tmp_path, capsys):
    _vector().save(tmp_path / "sv.safetensors")
    out = tmp_path / "sv.gguf"
    out.write_text("precious")
    argv = ["export-vector", "--vector", str(tmp_path / "sv.safetensors"), "--alpha", "1", "--layers", "1-2",
            "-o", str(out)]
    assert cli.main(argv) == 2
    assert "pass overwrite=True (CLI: --overwrite)" in capsys.readouterr().err and out.read_text() == "precious"
    assert cli.main([*argv, "--overwrite"]) == 0
    assert list(from_gguf(out)) == [1, 2]


def test_reader_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such control vector file"):
        from_gguf(tmp_path / "missing.gguf")


def test_cli_exports_the_saved_vector(tmp_path, capsys):
    sv = _vector()
    sv.save(tmp_path / "sv.safetensors")
    out = tmp_path / "sv.gguf"
    assert cli.main(["export-vector", "--vector", str(tmp_path / "sv.safetensors"), "--format", "gguf",
                     "--alpha", "0.5", "--layers", "1-2", "-o", str(out)]) == 0
    assert "--control-vector" in capsys.readouterr().out
    read = from_gguf(out)
    expected = control_vectors(sv, 0.5, site="resid_post", formula="add")
    assert list(read) == list(expected)
    for n in read:
        torch.testing.assert_close(read[n], expected[n], rtol=0, atol=0)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--formula", "official"], "formula='official' cannot be a llama.cpp control vector"),
        (["--site", "mlp_out"], "Pass model_type="),
        (["--layers", "0-2"], "Export layers 1..2"),
    ],
)
def test_cli_refusals_exit_2_with_the_reason(tmp_path, capsys, argv, match):
    _vector({0: 1.0, 1: 1.0, 2: 1.0}).save(tmp_path / "sv.safetensors")
    out = tmp_path / "sv.gguf"
    assert cli.main(["export-vector", "--vector", str(tmp_path / "sv.safetensors"), "--alpha", "1",
                     "--layers", "1-2", *argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sa-lens export-vector: ") and match in err
    assert not out.exists()
