"""generate(): chat template, left padding, KV cache parity, hooks honoured."""

from __future__ import annotations

import pytest
import torch

import sa_lens
from sa_lens.errors import InputError
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


def test_unseeded_sampling_draws_fresh_samples_on_every_call(tiny_bridge):
    torch.manual_seed(0)
    draws = {tuple(sa_lens.generate(tiny_bridge, PROMPTS, 12, do_sample=True, temperature=5.0, seed=None))
             for _ in range(3)}
    assert len(draws) == 3  # a forked, unseeded RNG would replay one draw


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


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """Gemma-2 (template writes <bos>), Phi-3 (template without <s>, tokenizer adds it) and Qwen2 (no BOS at all)."""
    from model_families import build_family_dir

    return {n: build_family_dir(n, tmp_path_factory.mktemp(n)) for n in ("gemma2", "phi3", "qwen2")}


def _fed_inputs(model, hf, run) -> list[list[int]]:
    """The unpadded rows of the first forward pass of ``hf`` (the prompt pass) while ``run()`` generates."""
    seen = []

    def grab(module, args, kwargs):
        if not seen:
            seen.append((kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist()))

    handle = hf.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    ids, mask = seen[0]
    return [[t for t, m in zip(row, keep) if m] for row, keep in zip(ids, mask)]


@pytest.mark.parametrize("name", ["gemma2", "phi3", "qwen2"])
@pytest.mark.parametrize("chat_template", [True, False])
@pytest.mark.parametrize("which", ["bridge", "hf"])
def test_generate_feeds_exactly_one_bos_on_every_path(family_models, name, chat_template, which):
    if which == "bridge":
        model = sa_lens.load_model(family_models[name])
        hf, tok, kwargs = model.original_model, model.tokenizer, {}
    else:
        hf, tok = sa_lens.load_hf_model(family_models[name])
        model, kwargs = hf, {"tokenizer": tok}
    rows = _fed_inputs(model, hf, lambda: sa_lens.generate(model, PROMPTS, 2, chat_template=chat_template, **kwargs))
    bos = tok.bos_token_id
    adds_bos = bos is not None and tok("x")["input_ids"][0] == bos
    assert len(rows) == len(PROMPTS) and len({len(r) for r in rows}) > 1  # one left-padded batch
    for row in rows:
        assert (row[0] == bos) == adds_bos
        assert row[1] != bos or not adds_bos


def test_stop_tokens_are_the_configured_eos_and_the_templates_end_of_turn(family_models):
    """Unit level; tests/unit/test_model_families.py checks that generation stops on them on every family."""
    from sa_lens.generation import stop_token_ids
    from sa_lens.prompts import end_of_turn_ids

    bridge = sa_lens.load_model(family_models["qwen2"])
    tok = bridge.tokenizer
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert bridge.original_model.generation_config.eos_token_id == endoftext  # the upload lists this one only
    assert im_end in end_of_turn_ids(tok)
    assert set(stop_token_ids(bridge.original_model, tok)) == {endoftext, im_end}


def test_end_of_turn_ids_of_a_tokenizer_without_template_is_its_eos(tiny_bridge):
    from sa_lens.prompts import end_of_turn_ids

    tok = tiny_bridge.tokenizer
    template, tok.chat_template = tok.chat_template, None
    try:
        assert end_of_turn_ids(tok) == [tok.eos_token_id]
    finally:
        tok.chat_template = template


def test_tokenize_padded_refuses_an_empty_batch(tiny_bridge):
    from sa_lens.prompts import tokenize_left_padded

    with pytest.raises(ValueError, match="texts is empty"):
        tokenize_left_padded(tiny_bridge.tokenizer, [])


def test_a_system_prompt_on_a_template_without_system_role_is_an_input_error(family_models):
    bridge = sa_lens.load_model(family_models["gemma2"])
    with pytest.raises(InputError, match="no system role"):
        format_prompts(bridge.tokenizer, ["hi"], system_prompt="Be safe.")


def test_raw_format_gets_the_checkpoints_bos_rule_on_a_bridge_too(tiny_dir, tiny_bridge):
    # The tiny ChatML tokenizer (as SmolLM2's) defines a BOS (<|im_start|>) but never adds one; TransformerLens's
    # tokenizer would put it before every raw prompt, so bridge and HF model would read different inputs.
    from sa_lens.prompts import token_ids

    _, hf_tok = sa_lens.load_hf_model(tiny_dir)
    texts = format_prompts(hf_tok, ["hi", "How do I bake bread?"], chat_template=False)
    assert tiny_bridge.tokenizer("x")["input_ids"][0] == tiny_bridge.tokenizer.bos_token_id  # TransformerLens's own
    ours = token_ids(tiny_bridge.tokenizer, texts)
    assert ours == token_ids(hf_tok, texts) == hf_tok(texts, add_special_tokens=False)["input_ids"]
    hf, _ = sa_lens.load_hf_model(tiny_dir)
    assert generate_tokens(tiny_bridge, texts, 6, add_special_tokens=True) == generate_tokens(
        hf, texts, 6, tokenizer=hf_tok, add_special_tokens=True
    )


def test_a_text_with_no_tokens_is_refused_by_name(tiny_bridge):
    from sa_lens.prompts import tokenize_left_padded

    with pytest.raises(InputError, match=r"text 1 \(''\) has no tokens"):
        tokenize_left_padded(tiny_bridge.tokenizer, ["How do I", ""], add_special_tokens=True)


def test_end_of_turn_ids_fall_back_to_eos_for_a_template_without_assistant_turns(tiny_bridge):
    from copy import deepcopy

    from sa_lens.prompts import end_of_turn_ids

    tok = deepcopy(tiny_bridge.tokenizer)
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    assert end_of_turn_ids(tok) == [tok.eos_token_id]


def test_a_model_left_in_train_mode_generates_and_scores_as_in_eval_mode_and_stays_in_train(tiny_dir):
    from sa_lens.evaluation.multiple_choice import continuation_logprobs

    hf, tok = sa_lens.load_hf_model(tiny_dir)
    texts = format_prompts(tok, ["How do I bake bread?", "hi"])
    want = generate_tokens(hf, texts, 6, tokenizer=tok)
    want_ll = continuation_logprobs(hf, ["Q: sky?\nA:"], [" blue"], tokenizer=tok)
    for layer in hf.model.layers:  # dropout that acts only in train mode
        layer.self_attn.attention_dropout = 0.5
    hf.train()
    torch.manual_seed(0)
    assert generate_tokens(hf, texts, 6, tokenizer=tok) == want
    assert torch.equal(continuation_logprobs(hf, ["Q: sky?\nA:"], [" blue"], tokenizer=tok), want_ll)
    assert all(m.training for m in hf.modules())
