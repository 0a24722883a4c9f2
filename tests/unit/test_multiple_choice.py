"""Log-likelihood scoring of options: equals a direct computation, batch-invariant, MC2 a probability."""

from __future__ import annotations

import torch

from sa_lens.data.public import MCItem, MCSet
from sa_lens.evaluation.multiple_choice import continuation_logprobs, mc_prompt, score_items


def test_logprob_equals_a_direct_forward(tiny_bridge):
    tok = tiny_bridge.tokenizer
    ctx, cont = "The capital of France is", " Paris"
    got = continuation_logprobs(tiny_bridge, [ctx], [cont])[0]
    c_ids = tok(ctx, add_special_tokens=True)["input_ids"]
    x_ids = tok(cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = tiny_bridge.original_model(torch.tensor([c_ids + x_ids])).logits[0]
    logp = torch.log_softmax(logits, -1)
    want = sum(logp[len(c_ids) - 1 + k, t] for k, t in enumerate(x_ids))
    assert torch.isclose(got, want, atol=1e-4)


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


def test_mmlu_prompt_lists_options_and_asks_for_a_letter():
    item = MCItem("0", "2+2?", ("3", "4"), (0, 1))
    ctx, conts = mc_prompt(item, "letter", shots=[item])
    assert ctx.count("A. 3\nB. 4\nAnswer:") == 2 and " B\n\n" in ctx and conts == [" A", " B"]


def test_plain_hugging_face_model_scores_like_its_bridge(tiny_bridge, tiny_dir):
    import sa_lens

    hf, _ = sa_lens.load_hf_model(tiny_dir)
    ctxs, conts = ["Q: sky?\nA:", "Q: bread?\nA:"], [" blue", " flour and water"]
    # The bridge's tokenizer adds a BOS that the checkpoint's own tokenizer does not, so both get the bridge's.
    assert torch.allclose(continuation_logprobs(hf, ctxs, conts, tokenizer=tiny_bridge.tokenizer),
                          continuation_logprobs(tiny_bridge, ctxs, conts), atol=1e-4)


def test_a_plain_model_with_its_own_tokenizer_scores_like_its_bridge(tiny_bridge, tiny_dir):
    # The newcomer's call: evaluate(hf_model, ..., tokenizer=<the checkpoint's tokenizer>). Its tokenizer adds no
    # BOS while the bridge's does; scores must not depend on which tokenizer object is passed.
    import sa_lens

    hf, tok = sa_lens.load_hf_model(tiny_dir)
    tok.padding_side = "left"
    ctxs = ["Q: What is two plus two?\nA:", "Q: sky?\nA:", "Q: bread?\nA:"]
    conts = [" four", " The sky is blue", " I'm sorry, but I can't help with that request"]
    got = continuation_logprobs(hf, ctxs, conts, tokenizer=tok, batch_size=3)
    # Reference: one example at a time, BOS + context + continuation, no padding.
    want = []
    for c, x in zip(ctxs, conts):
        c_ids = [tok.bos_token_id] + tok(c, add_special_tokens=False)["input_ids"]
        x_ids = tok(x, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([c_ids + x_ids])).logits[0].float(), -1)
        want.append(sum(logp[len(c_ids) - 1 + k, t] for k, t in enumerate(x_ids)))
    assert torch.allclose(got, torch.stack(want), atol=1e-4)
    assert torch.allclose(got, continuation_logprobs(tiny_bridge, ctxs, conts, batch_size=2), atol=1e-4)
