"""Small supervised full fine-tunes on (prompt, response) pairs: θH and the lab's aligned and SFT models.

The paper trains θH by full fine-tuning on harmful QA pairs with LLaMA-Factory and reports no
hyper-parameters (paper-notes.md §2.2); this is the plain recipe: chat template, loss on the response
tokens only, AdamW, constant learning rate, seeded batch order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sa_lens.errors import InputError
from sa_lens.prompts import token_ids

__all__ = ["finetune", "supervised_batch"]

IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt and padding positions)


def supervised_batch(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[tuple[str, str]], max_length: int = 256
) -> dict[str, torch.Tensor]:
    """Tokenize chat-formatted (prompt, response) pairs, right-padded, with labels only on the response.

    The response ends with the tokenizer's eos (for chat models the end-of-turn token), so the model
    learns to stop.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``: each ``Int[Tensor, "batch pos"]``.
    """
    rows, labels = [], []
    for prompt, response in examples:
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        head_ids = token_ids(tokenizer, [head])[0]
        tail_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (head_ids + tail_ids)[:max_length]
        rows.append(ids)
        labels.append(([IGNORE_INDEX] * len(head_ids) + tail_ids)[:max_length])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels]),
    }


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]],
    steps: int,
    lr: float = 5e-5,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool | str = False,
) -> list[float]:
    """Full fine-tune of ``model`` in place on (prompt, response) pairs.

    Args:
        model: a Hugging Face causal LM (train the plain model, not the bridge: hooks only cost time here).
        tokenizer: its tokenizer (must have a chat template).
        examples: (user prompt, assistant response) pairs; batches cycle through a seeded permutation.
        steps: optimizer steps.
        lr: AdamW learning rate, constant.
        batch_size: examples per step.
        seed: batch order seed.
        progress: show a tqdm bar; a string is used as its label.

    Returns:
        The training loss per step (mean cross-entropy over response tokens, nats/token).

    Raises:
        ValueError: no examples or ``steps < 1``.
    """
    if len(examples) == 0 or steps < 1:
        raise InputError(f"finetune needs at least one example and steps ≥ 1 (got {len(examples)}, {steps}).")
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=progress if isinstance(progress, str) else "fine-tune", disable=not progress, leave=False)
    try:
        for _ in bar:
            while len(order) < batch_size:
                order += torch.randperm(len(examples), generator=generator).tolist()
            batch_idx, order = order[:batch_size], order[batch_size:]
            batch = supervised_batch(tokenizer, [examples[i] for i in batch_idx])
            loss = model(**{k: v.to(model.device) for k, v in batch.items()}).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        model.eval()
    return losses
