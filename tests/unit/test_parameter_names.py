"""Parameter names of real architectures (tiny models built from transformers configs): layer, kind, projection.

The expected layer and kind of each parameter come from the module tree, not from its name: the index of the
decoder block (the ``ModuleList`` of ``num_hidden_layers`` blocks) holding it, and the class of the module that
owns it (``…Attention``, ``…MLP``, ``…Norm``, ``nn.Embedding`` or the output embedding).
"""

from __future__ import annotations

import pytest
import transformers as T
from torch import nn

from sa_lens.harm_vector import checkpoint_parameters
from sa_lens.parameter_names import (
    attention_projection,
    layer_index,
    parameter_kind,
    select_names,
)

_SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=32)
ARCHITECTURES = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=32)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_SMALL)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_SMALL)),
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**_SMALL, head_dim=8)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_SMALL)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**_SMALL, pad_token_id=0)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)),
}
# Projection matrices by module name, where the architecture has them separate and in [out, in] layout.
PROJECTIONS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "dense": "o"}


def _expected(model: nn.Module) -> dict[str, tuple[int | None, str]]:
    """``{name: (block index, kind)}`` read off the module tree."""
    n_layers = model.config.num_hidden_layers
    blocks = next(m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers)
    block_of = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    output = model.get_output_embeddings()
    expected = {}
    for module_name, module in model.named_modules():
        owners = [type(m).__name__ for m in _ancestors(model, module_name)]
        for pname, p in module.named_parameters(recurse=False):
            if "Norm" in type(module).__name__:
                kind = "norms"
            elif isinstance(module, nn.Embedding) or module is output:
                kind = "embeddings"
            elif any("Attention" in o for o in owners):
                kind = "attention"
            elif any("MLP" in o for o in owners):
                kind = "mlp"
            else:
                kind = "other"
            expected[f"{module_name}.{pname}"] = (block_of.get(id(p)), kind)
    return expected


def _ancestors(model: nn.Module, module_name: str) -> list[nn.Module]:
    parts = module_name.split(".") if module_name else []
    return [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) + 1)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layer_and_kind_match_the_module_tree(arch):
    model = ARCHITECTURES[arch]()
    expected = _expected(model)
    got = {n: (layer_index(n), parameter_kind(n)) for n in expected}
    assert got == expected
    assert {layer for layer, _ in got.values()} == {None, 0, 1, 2}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attention_projection_names_the_separate_linear_matrices(arch):
    model = ARCHITECTURES[arch]()
    got = {n: attention_projection(n) for n, _ in model.named_parameters()}
    expected = {}
    for n, _ in model.named_parameters():
        module, _, leaf = n.rpartition(".")
        role = PROJECTIONS.get(module.rpartition(".")[2])
        is_linear = isinstance(model.get_submodule(module), nn.Linear)
        expected[n] = role if role and leaf == "weight" and is_linear and parameter_kind(n) == "attention" else None
    assert got == expected
    if arch in ("gpt2", "phi3", "gpt_neox"):  # fused q/k/v: no q rows to slice by head
        assert "q" not in got.values()
    else:
        assert sorted(v for v in got.values() if v) == sorted("qkvo" * 3)


def test_gemma2_has_four_norms_per_layer_all_of_kind_norms():
    names = [n for n, _ in ARCHITECTURES["gemma2"]().named_parameters() if layer_index(n) == 2 and "layernorm" in n]
    assert {n.split(".")[3] for n in names} == {"input_layernorm", "post_attention_layernorm",
                                                 "pre_feedforward_layernorm", "post_feedforward_layernorm"}
    assert {parameter_kind(n) for n in names} == {"norms"}


def test_bridge_names_map_like_checkpoint_names(tiny_bridge):
    raw = [n for n, _ in tiny_bridge.original_model.named_parameters()]
    assert all("._original_component." in n for n in raw)
    for bridge_name, checkpoint_name in zip(raw, checkpoint_parameters(tiny_bridge)):
        assert layer_index(bridge_name) == layer_index(checkpoint_name)
        assert parameter_kind(bridge_name) == parameter_kind(checkpoint_name)
        assert attention_projection(bridge_name) == attention_projection(checkpoint_name)
    assert {parameter_kind(n) for n in raw} == {"attention", "mlp", "embeddings", "norms"}


def _llava() -> nn.Module:
    vision = T.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                                image_size=16, patch_size=8, projection_dim=16)
    return T.LlavaForConditionalGeneration(
        T.LlavaConfig(vision_config=vision, text_config=T.LlamaConfig(**_SMALL), image_token_index=63))


def _qwen2_vl() -> nn.Module:
    vision = dict(depth=4, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1)
    return T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(vision_config=vision, text_config=_SMALL, **_SMALL))


@pytest.mark.parametrize("build", [_llava, _qwen2_vl], ids=["llava", "qwen2_vl"])
def test_vision_tower_blocks_are_not_decoder_layers(build):
    names = [n for n, _ in build().named_parameters()]
    tower = [n for n in names if "vision_tower" in n or "visual" in n or "multi_modal_projector" in n]
    language = [n for n in names if n not in tower]
    assert tower and {parameter_kind(n) for n in tower} == {"tower"}
    assert {layer_index(n) for n in tower} == {None}  # the towers have 4 blocks, the decoder 3
    assert {attention_projection(n) for n in tower} == {None}
    assert {layer_index(n) for n in language} == {None, 0, 1, 2}
    assert select_names(names, layers=[3]) == []
    assert set(select_names(names, kinds=["attention"])) == {n for n in language if ".self_attn." in n}


@pytest.mark.parametrize(
    "name",
    ["vision_tower.vision_model.encoder.layers.3.self_attn.q_proj.weight",  # checkpoints written by transformers 4
     "model.vision_model.encoder.layers.3.mlp.fc1.weight",  # Idefics3 / SmolVLM
     "audio_tower.layers.3.self_attn.k_proj.weight"],
)
def test_tower_names_of_other_layouts_have_no_decoder_layer(name):
    assert layer_index(name) is None and parameter_kind(name) == "tower"


def test_language_model_of_a_transformers4_multimodal_checkpoint_keeps_its_layers():
    name = "language_model.model.layers.3.self_attn.o_proj.weight"
    assert (layer_index(name), parameter_kind(name), attention_projection(name)) == (3, "attention", "o")

