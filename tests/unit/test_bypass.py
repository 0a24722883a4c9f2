"""sa_lens.bypass: bridge components no hook needs run as the Hugging Face modules they wrap, with the same values."""

from __future__ import annotations

import contextlib

import pytest
import torch
from model_families import build_family_dir
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformers import AutoModelForCausalLM

import sa_lens
import sa_lens.generation as generation
from sa_lens.bypass import bypass_unhooked
from sa_lens.generation import generate_tokens
from sa_lens.prompts import format_prompts, tokenize_left_padded

PROMPTS = ["How do I pick a lock?", "Write a poem about the sea", "hi"]


@pytest.fixture()
def enc(tiny_bridge):
    return tokenize_left_padded(tiny_bridge.tokenizer, format_prompts(tiny_bridge.tokenizer, PROMPTS))


def _bridge_components(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, GeneralizedComponent)]


def _logits(bridge, enc) -> torch.Tensor:
    with torch.inference_mode():
        return bridge.original_model(**enc).logits


def test_with_no_hook_the_model_is_plain_hugging_face_with_sdpa(tiny_bridge, tiny_dir, enc):
    hf = tiny_bridge.original_model
    tree = [(n, m) for n, m in hf.named_modules()]
    assert hf.config._attn_implementation == "eager"  # the bridge's own choice, for hook_pattern
    with bypass_unhooked(tiny_bridge) as n:
        assert n > 0 and _bridge_components(hf) == []
        assert hf.config._attn_implementation == "sdpa"
        fast = _logits(tiny_bridge, enc)
    assert [(n, m) for n, m in hf.named_modules()] == tree  # the same module objects at the same names
    assert hf.config._attn_implementation == "eager"
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.inference_mode():
        reference = plain(**enc).logits
    real = enc["attention_mask"].bool()
    assert torch.equal(fast[real], reference[real])
    torch.testing.assert_close(fast[real], _logits(tiny_bridge, enc)[real], atol=1e-4, rtol=0)


def test_hooked_points_keep_their_components_and_fire_on_the_same_values(tiny_bridge, enc):
    seen: dict[str, list[torch.Tensor]] = {"bridge": [], "bypassed": []}
    run = ["bridge"]
    push = torch.full((tiny_bridge.cfg.d_model,), 0.5)

    def hook(x, hook):
        seen[run[0]].append(x.clone())
        return x + push

    with tiny_bridge.hooks(fwd_hooks=[("blocks.1.mlp.hook_out", hook)]):
        full = _logits(tiny_bridge, enc)
        run[0] = "bypassed"
        with bypass_unhooked(tiny_bridge):
            layers = tiny_bridge.original_model.model.layers
            # What runs: the hooked MLP stays (with its hook points); all else, its block too, is bypassed.
            runs = {"layer 0": layers[0], "layer 1": layers[1], "mlp 1": layers[1].mlp,
                    "attention 1": layers[1].self_attn, "norm 1": layers[1].input_layernorm}
            bridged = {k for k, m in runs.items() if isinstance(m, GeneralizedComponent)}
            fast = _logits(tiny_bridge, enc)
    assert bridged == {"mlp 1"}
    assert len(seen["bypassed"]) == len(seen["bridge"]) == 1
    real = enc["attention_mask"].bool()  # sdpa and eager may disagree at padding, which nothing reads
    torch.testing.assert_close(seen["bypassed"][0][real], seen["bridge"][0][real], atol=1e-4, rtol=0)
    torch.testing.assert_close(fast[real], full[real], atol=1e-4, rtol=0)
    assert not torch.allclose(fast, _logits(tiny_bridge, enc))  # the hook acted


def test_a_hooked_block_stays_while_its_attention_and_mlp_go(tiny_bridge, enc):
    seen = []
    with tiny_bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: seen.append(x) or x * 0.5)]):
        full = _logits(tiny_bridge, enc)
        with bypass_unhooked(tiny_bridge):
            layer = tiny_bridge.original_model.model.layers[0]
            assert isinstance(layer, GeneralizedComponent)
            assert not any(isinstance(m, GeneralizedComponent) for m in layer.original_component.children())
            fast = _logits(tiny_bridge, enc)
    real = enc["attention_mask"].bool()
    assert len(seen) == 2
    torch.testing.assert_close(fast[real], full[real], atol=1e-4, rtol=0)


def test_a_query_hook_on_a_fused_projection_keeps_the_attention(tmp_path):
    """GPT-2's q/k/v are split out of one fused projection: the HF attention never calls them, so it stays."""
    bridge = sa_lens.load_model(build_family_dir("gpt2", tmp_path / "gpt2"))
    enc = tokenize_left_padded(bridge.tokenizer, format_prompts(bridge.tokenizer, PROMPTS, chat_template=False))
    seen = []
    with bridge.hooks(fwd_hooks=[("blocks.1.attn.hook_q", lambda x, hook: seen.append(x) or x * 2.0)]):
        full = _logits(bridge, enc)
        with bypass_unhooked(bridge):
            attention = bridge.original_model.transformer.h[1].attn
            assert isinstance(attention, GeneralizedComponent)
            fast = _logits(bridge, enc)
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], seen[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(fast, full, atol=1e-4, rtol=0)  # one attention kept: eager everywhere


def test_a_hooked_attention_keeps_eager_attention_and_the_bridges_values_bit_for_bit(tiny_bridge, enc):
    patterns: list[torch.Tensor] = []
    with tiny_bridge.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: patterns.append(x))]):
        full = _logits(tiny_bridge, enc)
        with bypass_unhooked(tiny_bridge):
            assert tiny_bridge.original_model.config._attn_implementation == "eager"
            fast = _logits(tiny_bridge, enc)
    assert len(patterns) == 2 and torch.equal(patterns[0], patterns[1])
    assert torch.equal(fast, full)


def test_a_plain_torch_hook_on_a_bridge_component_keeps_it(tiny_bridge, enc):
    calls = []
    handle = tiny_bridge.blocks[0].ln2.register_forward_hook(lambda m, a, out: calls.append(1))
    try:
        with bypass_unhooked(tiny_bridge):
            _logits(tiny_bridge, enc)
    finally:
        handle.remove()
    assert calls == [1]


def test_the_tree_and_attention_come_back_after_an_exception(tiny_bridge):
    hf = tiny_bridge.original_model
    tree = [(n, m) for n, m in hf.named_modules()]
    with pytest.raises(RuntimeError, match="inside"), bypass_unhooked(tiny_bridge):
        raise RuntimeError("inside")
    assert [(n, m) for n, m in hf.named_modules()] == tree
    assert hf.config._attn_implementation == "eager"


@pytest.mark.parametrize("mode", ["compatibility", "processed weights"])
def test_compatibility_mode_and_processed_weights_run_the_bridge_as_is(tiny_dir, mode):
    bridge = sa_lens.load_model(tiny_dir)
    if mode == "compatibility":
        bridge.enable_compatibility_mode(disable_warnings=True)
    else:
        bridge.process_weights()
    with bypass_unhooked(bridge) as n:
        assert n == 0 and bridge.original_model.config._attn_implementation == "eager"


def test_generation_bypasses_and_leaves_the_bridge_as_it_was(tiny_bridge, monkeypatch):
    counts: list[int] = []

    @contextlib.contextmanager
    def counting(bridge):
        with bypass_unhooked(bridge) as n:
            counts.append(n)
            yield n

    monkeypatch.setattr(generation, "bypass_unhooked", counting)
    before = _bridge_components(tiny_bridge.original_model)
    rows = generate_tokens(tiny_bridge, format_prompts(tiny_bridge.tokenizer, PROMPTS), 4)
    assert len(rows) == 3 and counts and counts[0] > 0
    assert _bridge_components(tiny_bridge.original_model) == before
