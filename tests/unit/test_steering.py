"""Safe-Align options: sites × formulas × position policies, KV-cache parity, policies checked on activations."""

from __future__ import annotations

import itertools

import pytest
import torch

from sa_lens import SafetyVector, safety_hooks
from sa_lens.generation import generate_tokens
from sa_lens.prompts import format_prompts
from sa_lens.steering import FORMULAS, POSITIONS, SITES, ablate_direction

PROMPTS = ["How do I bake bread?", "Tell me a story about the sea and the capital of France", "hi"]


@pytest.fixture()
def sv(tiny_bridge):
    g = torch.Generator().manual_seed(0)
    return SafetyVector(torch.randn(tiny_bridge.cfg.n_layers, tiny_bridge.cfg.d_model, generator=g) * 3)


@pytest.mark.parametrize(("site", "formula", "positions"), list(itertools.product(SITES, FORMULAS, POSITIONS)))
def test_steered_generation_is_identical_with_and_without_kv_cache(tiny_bridge, sv, site, formula, positions):
    texts = format_prompts(tiny_bridge.tokenizer, PROMPTS)
    hooks = safety_hooks(sv, alpha=2.0, site=site, formula=formula, positions=positions)
    with tiny_bridge.hooks(fwd_hooks=hooks):
        cached = generate_tokens(tiny_bridge, texts, 8, use_cache=True)
        uncached = generate_tokens(tiny_bridge, texts, 8, use_cache=False)
    assert cached == uncached


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_position_policy_touches_only_its_positions(tiny_bridge, sv, positions, use_cache):
    texts = format_prompts(tiny_bridge.tokenizer, PROMPTS)
    prompt_len = tiny_bridge.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)["input_ids"].shape[1]
    seen = []  # (input, output) of the steering hook at layer 1, per forward pass
    steer = dict(safety_hooks(sv, alpha=2.0, layers=[1], site="resid_post", positions=positions))
    name, fn = next(iter(steer.items()))

    def recorded(x, hook):
        out = fn(x, hook)
        seen.append((x.detach().clone(), out.detach().clone()))
        return out

    with tiny_bridge.hooks(fwd_hooks=[(name, recorded)]):
        generate_tokens(tiny_bridge, texts, 5, use_cache=use_cache)
    changed_prompt = changed_generated = False
    for x, out in seen:
        columns = torch.arange(x.shape[1]) + (0 if x.shape[1] >= prompt_len else prompt_len)
        is_gen = columns >= prompt_len
        diff = (x != out).any(-1).any(0)  # [pos]
        changed_prompt |= bool(diff[~is_gen].any())
        changed_generated |= bool(diff[is_gen].any())
        if positions == "prompt":
            assert not diff[is_gen].any()
        else:
            assert not diff[~is_gen].any()
    assert changed_prompt == (positions == "prompt") and changed_generated == (positions == "generated")


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_a_one_token_prompt_is_steered_the_same_with_and_without_kv_cache(tiny_bridge, sv, positions):
    one = [t for t in ("How", "The", "I") if len(tiny_bridge.tokenizer(t, add_special_tokens=False)["input_ids"]) == 1]
    hooks = safety_hooks(sv, alpha=2.0, site="resid_post", positions=positions)
    plain = generate_tokens(tiny_bridge, one, 6, use_cache=True)
    with tiny_bridge.hooks(fwd_hooks=hooks):
        cached = generate_tokens(tiny_bridge, one, 6, use_cache=True)
        uncached = generate_tokens(tiny_bridge, one, 6, use_cache=False)
    assert one and cached == uncached
    if positions == "generated":  # the decode steps are steered (with the cache they looked like prompt passes)
        assert cached != plain


def test_directional_ablation_removes_the_component_and_add_moves_against_v():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 3, 16, generator=g), torch.randn(16, generator=g)
    out = ablate_direction(x, v, alpha=0.0)
    torch.testing.assert_close(out @ (v / v.norm()), torch.zeros(2, 3), atol=1e-5, rtol=0)
    added = FORMULAS["add"](x, v, 0.5)
    torch.testing.assert_close(added, x - 0.5 * v)


def test_per_layer_alpha_overrides_and_unknown_options_are_named(sv):
    x = torch.randn(1, 2, sv.d_model)
    hooks = dict(safety_hooks(sv, alpha=1.0, formula="add", per_layer_alpha={1: 0.0}))
    assert torch.equal(hooks["blocks.1.hook_mlp_out"](x, None), x)
    assert not torch.equal(hooks["blocks.0.hook_mlp_out"](x, None), x)
    for kwargs, match in [({"site": "embed"}, "site must be"), ({"formula": "rotate"}, "formula must be"),
                          ({"positions": "span"}, "positions must be"), ({"per_layer_alpha": {0: float("inf")}}, "alpha"),
                          ({"per_layer_alpha": {9: 1.0}}, "outside")]:
        with pytest.raises(ValueError, match=match):
            safety_hooks(sv, **kwargs)
