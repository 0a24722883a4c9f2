"""The built-in multiple-choice scorer: lm-eval's joint encoding, prompts and BOS rule; batch-invariant; MC2 a mass.

Parity with lm-eval itself (its HFLM on the same model) is tests/unit/test_utility.py.
"""

from __future__ import annotations

import pytest
import torch

from sa_lens.bridge import checkpoint_tokenizer
from sa_lens.data.public import MCItem, MCSet
from sa_lens.errors import InputError
from sa_lens.evaluation.multiple_choice import (
    TRUTHFULQA_PRIMER,
    continuation_logprobs,
    encode_pair,
    mc_prompt,
    mmlu_shots,
    score_items,
)


def _direct(hf, ids: list[int], n_cont: int) -> torch.Tensor:
    """Σ log p of the last ``n_cont`` tokens of ``ids`` from one unpadded forward pass."""
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    return sum(logp[len(ids) - 1 - n_cont + k, ids[len(ids) - n_cont + k]] for k in range(n_cont))


def test_logprob_equals_a_direct_forward_on_the_joint_encoding(tiny_bridge):
    # Scored with the checkpoint's own tokenizer (this one adds no BOS), as `lm_eval --model hf` reads it, not with
    # TransformerLens's copy that always adds one.
    tok = checkpoint_tokenizer(tiny_bridge)
    assert tok("x")["input_ids"][0] != tok.bos_token_id and tiny_bridge.tokenizer("x")["input_ids"][0] == tok.bos_token_id
    ctx, cont = "The capital of France is", " Paris"
    whole = tok(ctx + cont)["input_ids"]
    n_ctx = len(tok(ctx)["input_ids"])
    got = continuation_logprobs(tiny_bridge, [ctx], [cont])[0]
    assert torch.isclose(got, _direct(tiny_bridge.original_model, whole, len(whole) - n_ctx), atol=1e-4)


def test_encode_pair_splits_the_joint_encoding_at_the_context(tiny_bridge):
    tok = tiny_bridge.tokenizer
    ctx_ids, cont_ids = encode_pair(tok, "Q: sky?\nA: ", "blue")  # the trailing space moves onto "blue"
    assert ctx_ids + cont_ids == tok("Q: sky?\nA: blue")["input_ids"]
    assert ctx_ids == tok("Q: sky?\nA:")["input_ids"]


def test_an_empty_context_is_the_bos_token(tiny_bridge):
    tok = tiny_bridge.tokenizer
    ctx_ids, cont_ids = encode_pair(tok, "", " blue")
    assert ctx_ids == [tok.bos_token_id] and cont_ids == tok(" blue", add_special_tokens=False)["input_ids"]


def test_batching_and_padding_do_not_change_scores(tiny_bridge):
    ctxs = ["Q: What is two plus two?\nA:", "Q: sky?\nA:", "Q: bread?\nA:"]
    conts = [" four", " The sky is blue", " flour water and yeast"]
    one = torch.stack([continuation_logprobs(tiny_bridge, [c], [x])[0] for c, x in zip(ctxs, conts)])
    assert torch.allclose(continuation_logprobs(tiny_bridge, ctxs, conts, batch_size=3), one, atol=1e-4)


def test_mc2_is_a_probability_and_letter_scoring_is_a_flag(tiny_bridge):
    item = MCItem("0", "Is the sky blue?", ("Yes", "No", "Sometimes"), (1, 0, 1))
    mc2 = score_items(tiny_bridge, MCSet("t", "mc2", (item,), "x"), [item])[0]
    assert 0.0 < mc2 < 1.0
    letter = MCItem("1", "2+2?", ("3", "4", "5", "6"), (0, 1, 0, 0))
    assert score_items(tiny_bridge, MCSet("m", "letter", (letter,), "x"), [letter])[0] in (0.0, 1.0)


def test_mmlu_prompt_has_the_subject_header_and_solved_shots():
    shot = MCItem("d0", "1+1? ", ("1", "2", "3", "4"), (0, 1, 0, 0), "high_school_mathematics")
    item = MCItem("t0", "2+2?", ("3", "4", "5", "6"), (0, 1, 0, 0), "high_school_mathematics")
    ctx, conts = mc_prompt(item, "letter", shots=[shot, shot])
    assert ctx == (
        "The following are multiple choice questions (with answers) about high school mathematics.\n\n"
        + "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n" * 2
        + "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )
    assert conts == [" A", " B", " C", " D"]


def test_truthfulqa_prompt_is_the_primer_then_the_question():
    item = MCItem("0", "Is the sky blue? ", ("Yes.", " No."), (1, 0))
    ctx, conts = mc_prompt(item, "mc1")
    assert ctx == TRUTHFULQA_PRIMER + "\n\nQ: Is the sky blue? \nA:" and conts == [" Yes.", "  No."]
    assert TRUTHFULQA_PRIMER.count("Q: ") == 6
    with pytest.raises(InputError, match="primer"):
        mc_prompt(item, "mc2", shots=[item])


def test_mmlu_shots_are_the_first_k_per_subject_in_file_order():
    dev = [MCItem(f"{s}-{i}", f"q{i}", ("a", "b", "c", "d"), (1, 0, 0, 0), s) for s in ("x", "y") for i in range(5)]
    shots = mmlu_shots(dev, k=3)
    assert [it.id for it in shots["x"]] == ["x-0", "x-1", "x-2"] and len(shots["y"]) == 3
    with pytest.raises(InputError, match="fewer"):
        mmlu_shots(dev[:4], k=5)


def test_plain_hugging_face_model_scores_like_its_bridge(tiny_bridge, tiny_dir):
    import sa_lens

    hf, own = sa_lens.load_hf_model(tiny_dir)  # each with its own tokenizer, as a user has them
    ctxs, conts = ["Q: sky?\nA:", "Q: bread?\nA:"], [" blue", " flour and water"]
    assert torch.allclose(continuation_logprobs(hf, ctxs, conts, tokenizer=own),
                          continuation_logprobs(tiny_bridge, ctxs, conts), atol=1e-4)


def test_bos_follows_the_tokenizer_unless_forced(tiny_bridge, tiny_dir):
    # lm-eval's HFLM: the checkpoint's own tokenizer adds no BOS, so none is scored — on the bridge too, whose
    # TransformerLens tokenizer would add one (passed explicitly, it does).
    import sa_lens

    hf, tok = sa_lens.load_hf_model(tiny_dir)
    ctxs, conts = ["Q: What is two plus two?\nA:", "Q: sky?\nA:"], [" four", " The sky is blue"]
    own = continuation_logprobs(hf, ctxs, conts, tokenizer=tok)
    want = []
    for c, x in zip(ctxs, conts):
        whole, n_ctx = tok(c + x)["input_ids"], len(tok(c)["input_ids"])
        assert whole[0] != tok.bos_token_id
        want.append(_direct(hf, whole, len(whole) - n_ctx))
    assert torch.allclose(own, torch.stack(want), atol=1e-4)
    assert torch.allclose(own, continuation_logprobs(tiny_bridge, ctxs, conts), atol=1e-4)
    assert not torch.allclose(own, continuation_logprobs(tiny_bridge, ctxs, conts, tokenizer=tiny_bridge.tokenizer),
                              atol=1e-4)


def test_inputs_beyond_the_context_window_lose_their_left_as_in_lm_eval(tiny_bridge):
    window = tiny_bridge.original_model.config.max_position_embeddings
    ctx, cont = "word " * 400 + "end", " of it"
    ctx_ids, cont_ids = encode_pair(tiny_bridge.tokenizer, ctx, cont)
    assert len(ctx_ids) + len(cont_ids) > window + 1
    kept = (ctx_ids + cont_ids)[-(window + 1) :]  # causal: the last token adds no logits to the ones scored
    got = continuation_logprobs(tiny_bridge, [ctx], [cont])[0]
    assert torch.isclose(got, _direct(tiny_bridge.original_model, kept, len(cont_ids)), atol=1e-4)


def test_only_the_scored_positions_are_unembedded_and_scores_equal_full_logits(tiny_bridge, monkeypatch):
    import sa_lens.evaluation.multiple_choice as mc

    # Rows 2 and 3 share one input (the same joint text, split at different points): continuations of 4+ and 1 tokens.
    ctxs = ["Q: What is two plus two?\nA:", "Q: sky?\nA:", "Q: sky?\nA: The sky is", "Q: sky?\nA:"]
    conts = [" four", " The sky is blue", " blue", " blue"]
    tok = checkpoint_tokenizer(tiny_bridge)
    pairs = [encode_pair(tok, c, x) for c, x in zip(ctxs, conts)]
    assert pairs[1][0] + pairs[1][1][:-1] == pairs[2][0] + pairs[2][1][:-1] and len(pairs[1][1]) > len(pairs[2][1])
    hf = tiny_bridge.original_model
    kept, forward = [], hf.forward

    def spy(*args, **kwargs):
        kept.append(kwargs.get("logits_to_keep"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(hf, "forward", spy)
    few = continuation_logprobs(tiny_bridge, ctxs, conts, batch_size=4)
    width = max(len(c) + len(x) - 1 for c, x in pairs)
    first = min(len(c) - 1 for c, _ in pairs)  # the earliest position that predicts a continuation token
    assert kept == [width - first] and width - first < width  # from there on, not every position
    monkeypatch.setattr(mc, "_keeps_logits", lambda hf: False)  # a model whose forward has no logits_to_keep
    full = continuation_logprobs(tiny_bridge, ctxs, conts, batch_size=4)
    assert kept[-1] is None
    assert torch.allclose(few, full, atol=1e-5)
    one = torch.stack([continuation_logprobs(tiny_bridge, [c], [x])[0] for c, x in zip(ctxs, conts)])
    assert torch.allclose(few, one, atol=1e-4)


def test_a_hook_on_the_unembedding_sees_every_position(tiny_bridge):
    seen = []
    with tiny_bridge.hooks(fwd_hooks=[("unembed.hook_in", lambda x, hook: seen.append(x.shape[1]))]):
        continuation_logprobs(tiny_bridge, ["Q: What is two plus two?\nA:"], [" four"])
    ctx, cont = encode_pair(checkpoint_tokenizer(tiny_bridge), "Q: What is two plus two?\nA:", " four")
    assert seen == [len(ctx) + len(cont) - 1]


def test_a_torch_hook_on_a_plain_models_lm_head_sees_every_position(tiny_dir):
    import sa_lens

    hf, tok = sa_lens.load_hf_model(tiny_dir)
    seen = []
    handle = hf.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    try:
        continuation_logprobs(hf, ["Q: What is two plus two?\nA:"], [" four"], tokenizer=tok)
    finally:
        handle.remove()
    ctx, cont = encode_pair(tok, "Q: What is two plus two?\nA:", " four")
    assert seen == [len(ctx) + len(cont) - 1]


def test_a_context_that_encodes_to_nothing_is_refused(tiny_bridge):
    tok = checkpoint_tokenizer(tiny_bridge)
    assert tok(" ")["input_ids"] and not tok("")["input_ids"]  # no BOS added: a lone space is its only token
    with pytest.raises(InputError, match="encodes to no tokens"):
        encode_pair(tok, "   ", "blue")


def test_scoring_bypasses_unhooked_bridge_components_and_keeps_hooked_ones(tiny_bridge):
    hf = tiny_bridge.original_model
    components = {"attn": tiny_bridge.blocks[0].attn, "mlp": tiny_bridge.blocks[0].mlp}
    seen: dict[str, list[bool]] = {"attn": [], "mlp": []}
    # A hook on the wrapped Hugging Face module fires either way; it records whether the bridge component was in
    # the model's tree (needed) or had been swapped for the module it wraps (bypassed) during the pass.
    handles = [c.original_component.register_forward_hook(
        lambda *a, k=k, c=c: seen[k].append(any(m is c for m in hf.modules()))) for k, c in components.items()]
    try:
        plain = continuation_logprobs(tiny_bridge, ["Q: sky?\nA:"], [" blue"])
        assert seen == {"attn": [False], "mlp": [False]}  # both bypassed
        bump = ("blocks.0.hook_mlp_out", lambda x, hook: x + 1.0)
        with tiny_bridge.hooks(fwd_hooks=[bump]):
            steered = continuation_logprobs(tiny_bridge, ["Q: sky?\nA:"], [" blue"])
        assert seen == {"attn": [False, False], "mlp": [False, True]}  # the hooked MLP stayed and fired
        assert not torch.equal(steered, plain)
        assert all(any(m is c for m in hf.modules()) for c in components.values())  # the tree restored
    finally:
        for h in handles:
            h.remove()
