"""generate(): chat template, left padding, KV cache parity, hooks honoured."""

from __future__ import annotations

import pytest
import torch

import sa_lens
from sa_lens.generation import generate_tokens
from sa_lens.prompts import PAPER_PREFIX, format_prompts

PROMPTS = ["How do I bake bread?", "Tell me a story about the sea and the capital of France", "hi"]


def _hf_reference(tiny_dir, prompts, max_new_tokens):
    hf, tok = sa_lens.load_hf_model(tiny_dir)
    texts = format_prompts(tok, prompts)
    return generate_tokens(hf, texts, max_new_tokens, tokenizer=tok)


def test_greedy_with_cache_equals_without_cache_and_hugging_face(tiny_bridge, tiny_dir):
    texts = format_prompts(tiny_bridge.tokenizer, PROMPTS)
    cached = generate_tokens(tiny_bridge, texts, 12, use_cache=True)
    uncached = generate_tokens(tiny_bridge, texts, 12, use_cache=False)
    assert cached == uncached
    assert cached == _hf_reference(tiny_dir, PROMPTS, 12)
    assert len({tuple(r) for r in cached}) > 1  # the prompts matter: not one constant output


def test_batched_left_padded_equals_one_prompt_at_a_time(tiny_bridge):
    together = sa_lens.generate(tiny_bridge, PROMPTS, 10, batch_size=8)
    alone = [sa_lens.generate(tiny_bridge, [p], 10)[0] for p in PROMPTS]
    assert together == alone


def test_replies_come_back_in_input_order_despite_length_sorting(tiny_bridge):
    replies = sa_lens.generate(tiny_bridge, PROMPTS, 8, batch_size=1)
    assert replies == [sa_lens.generate(tiny_bridge, [p], 8)[0] for p in PROMPTS]


def test_active_hooks_fire_on_every_step_and_change_the_output(tiny_bridge):
    calls = []

    def record(x, hook):
        calls.append(x.shape[1])
        return x

    with tiny_bridge.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", record)]):
        sa_lens.generate(tiny_bridge, ["hi"], 5, use_cache=True)
    assert calls[0] > 1 and calls[1:] == [1] * (len(calls) - 1)  # prompt pass, then one position per step
    assert len(calls) >= 2

    plain = sa_lens.generate(tiny_bridge, PROMPTS, 8)
    with tiny_bridge.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", lambda x, hook: x * 0 + 3.0)]):
        steered = sa_lens.generate(tiny_bridge, PROMPTS, 8)
    assert steered != plain
    assert sa_lens.generate(tiny_bridge, PROMPTS, 8) == plain  # hook gone after the block


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny_bridge):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = sa_lens.generate(tiny_bridge, PROMPTS, 8, do_sample=True, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = sa_lens.generate(tiny_bridge, PROMPTS, 8, do_sample=True, temperature=1.0, seed=7)
    assert a == b


def test_paper_raw_format_has_prefix_and_no_template(tiny_bridge):
    texts = format_prompts(tiny_bridge.tokenizer, ["q"], chat_template=False)
    assert texts == [PAPER_PREFIX + "q"]
    assert sa_lens.generate(tiny_bridge, ["q"], 3, chat_template=False)  # runs end to end


@pytest.mark.parametrize(
    ("prompts", "kwargs", "match"),
    [
        ("one string", {}, "not one string"),
        ([], {}, "empty"),
        (["x"], {"max_new_tokens": 0}, "max_new_tokens"),
        (["x"], {"chat_template": False, "system_prompt": "s"}, "system_prompt needs chat_template"),
    ],
)
def test_bad_generation_arguments_are_named(tiny_bridge, prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sa_lens.generate(tiny_bridge, prompts, **({"max_new_tokens": 4} | kwargs))


def test_plain_hf_model_needs_its_tokenizer(tiny_dir):
    hf, _ = sa_lens.load_hf_model(tiny_dir)
    with pytest.raises(ValueError, match="tokenizer="):
        sa_lens.generate(hf, ["x"], 2)
