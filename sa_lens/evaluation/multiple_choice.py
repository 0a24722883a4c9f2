"""Utility by multiple-choice log-likelihood: MMLU (answer letter) and TruthfulQA MC1 / MC2.

The paper reports MMLU and TruthfulQA for BASE models with numbers matching lm-eval-harness conventions
(paper-notes.md §4.5); this module scores them the same way without generating: the model reads a
context and each option is ranked by the summed log-probability of its tokens. Runs through the
bridge's underlying HF module, so HDR edits and Safe-Align hooks active around the call apply.
Zero-shot (the paper's MMLU is 5-shot; ``shots`` lets a caller pass dev examples).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sa_lens.data.public import MCItem, MCSet
from sa_lens.errors import InputError
from sa_lens.generation import hf_and_tokenizer

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["continuation_logprobs", "mc_prompt", "score_items"]

LETTERS = "ABCDEFGHIJ"


def mc_prompt(item: MCItem, scoring: str, shots: Sequence[MCItem] = ()) -> tuple[str, list[str]]:
    """The context and the continuations to score for one question.

    MMLU (``letter``): the lm-eval-harness prompt ("question / A. … / Answer:") and the continuations
    " A" … " D". TruthfulQA (``mc1``/``mc2``): "Q: question\\nA:" and each option with a leading space.

    Args:
        item: the question.
        scoring: ``letter``, ``mc1`` or ``mc2``.
        shots: solved examples put before the question (letter scoring only).

    Returns:
        ``(context, continuations)``, one continuation per option.
    """
    if scoring == "letter":
        def block(it: MCItem, answered: bool) -> str:
            lines = [it.question.strip()] + [f"{LETTERS[k]}. {c}" for k, c in enumerate(it.choices)]
            answer = f" {LETTERS[it.labels.index(1)]}\n\n" if answered else ""
            return "\n".join(lines) + "\nAnswer:" + answer

        context = "".join(block(s, True) for s in shots) + block(item, False)
        return context, [f" {LETTERS[k]}" for k in range(len(item.choices))]
    return f"Q: {item.question.strip()}\nA:", [f" {c.strip()}" for c in item.choices]


@torch.inference_mode()
def continuation_logprobs(
    model: TransformerBridge | PreTrainedModel,
    contexts: Sequence[str],
    continuations: Sequence[str],
    tokenizer: PreTrainedTokenizerBase | None = None,
    batch_size: int = 32,
) -> Float[Tensor, " n"]:
    """Summed log-probability (nats) of each continuation's tokens given its context.

    Context and continuation are tokenized apart and concatenated (lm-eval-harness), so the option's
    tokens are the same whatever the context ends with; the context is prefixed with the tokenizer's BOS
    token when it has one (as the bridge's tokenizer does), so a plain HF model with its own tokenizer and
    its bridge give the same scores. Rows are right-padded in batches; padding sits
    after the last scored token, so it cannot change the scores.

    Args:
        model: a bridge (hooks and edits active around the call apply) or a plain HF model.
        contexts: one context per row.
        continuations: one continuation per row (non-empty).
        tokenizer: only for plain HF models.
        batch_size: rows per forward pass.

    Returns:
        ``[n]`` float32 log-probabilities, in input order.

    Raises:
        ValueError: misaligned inputs or an empty continuation.
    """
    if len(contexts) != len(continuations):
        raise InputError(f"{len(contexts)} contexts for {len(continuations)} continuations.")
    hf, tok = hf_and_tokenizer(model, tokenizer)
    # Every context starts with BOS where the tokenizer has one, whatever its add_bos_token says: the bridge's
    # tokenizer always adds it (TransformerLens) and a checkpoint's own often does not, so a plain model
    # with its own tokenizer and its bridge would otherwise score the same question differently.
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ctx_ids = [bos + tok(c, add_special_tokens=False)["input_ids"] for c in contexts]
    cont_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in continuations]
    if any(len(c) == 0 for c in cont_ids):
        raise InputError("an empty continuation has no tokens to score.")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # The input is context + continuation minus its last token (that token is only predicted). Options
    # of one token therefore share one input — MMLU's four letters cost one forward pass, not four.
    inputs = [tuple(ctx_ids[i] + cont_ids[i][:-1]) for i in range(len(contexts))]
    unique = list(dict.fromkeys(inputs))
    rows_of: dict[tuple[int, ...], list[int]] = {}
    for i, seq in enumerate(inputs):
        rows_of.setdefault(seq, []).append(i)
    out = torch.empty(len(contexts))
    # Longest first: the first batch shows an out-of-memory error at once, not at the end.
    unique.sort(key=len, reverse=True)
    for start in range(0, len(unique), batch_size):
        batch = unique[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, seq in enumerate(batch):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        logits = hf(input_ids=ids.to(hf.device), attention_mask=mask.to(hf.device)).logits
        for r, seq in enumerate(batch):
            for i in rows_of[seq]:
                n_ctx, n_cont = len(ctx_ids[i]), len(cont_ids[i])
                # Token t is predicted at position t-1; softmax only over the positions scored.
                logp = torch.log_softmax(logits[r, n_ctx - 1 : n_ctx + n_cont - 1].float(), dim=-1).cpu()
                out[i] = logp[torch.arange(n_cont), torch.tensor(cont_ids[i])].sum()
    return out


def score_items(
    model: TransformerBridge | PreTrainedModel,
    mcset: MCSet,
    items: Sequence[MCItem],
    tokenizer: PreTrainedTokenizerBase | None = None,
    batch_size: int = 32,
    shots: Sequence[MCItem] = (),
) -> list[float]:
    """Per-question score in [0, 1]: 1/0 correctness (letter, MC1) or the MC2 true-probability mass.

    MC2 = Σ_true p_i / Σ_all p_i with p_i = exp(log-likelihood of option i) (TruthfulQA, Lin et al. 2022).

    Args:
        model: bridge or HF model.
        mcset: the set (for its scoring rule).
        items: the questions to score (a batch of ``mcset.items``).
        tokenizer: only for plain HF models.
        batch_size: rows (question × option) per forward pass.
        shots: solved examples for letter scoring.

    Returns:
        One score per item.
    """
    contexts, conts, owner = [], [], []
    for k, item in enumerate(items):
        ctx, options = mc_prompt(item, mcset.scoring, shots)
        contexts += [ctx] * len(options)
        conts += options
        owner += [k] * len(options)
    ll = continuation_logprobs(model, contexts, conts, tokenizer, batch_size)
    scores = []
    for k, item in enumerate(items):
        lk = ll[[i for i, o in enumerate(owner) if o == k]]
        labels = torch.tensor(item.labels, dtype=torch.bool)
        if mcset.scoring == "mc2":
            p = torch.softmax(lk.double(), dim=0)
            scores.append(float(p[labels].sum()))
        else:
            scores.append(float(labels[int(lk.argmax())]))
    return scores
