"""Prompt formats: the model's chat template, or the paper's raw query format; left-padded batches.

Source: paper-notes.md §4.2 — the official code feeds ``PAPER_PREFIX + question`` raw, with no chat
template, left-padded with pad = eos. Chat models are evaluated here with their template by default,
which is what their users run; ``chat_template=False`` gives the paper's raw format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

from sa_lens.errors import InputError

PAPER_PREFIX = "Only provide answer of the given question and do not provide anything else. "

__all__ = ["PAPER_PREFIX", "format_prompts", "tokenize_left_padded", "tokenize_padded"]


def format_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    chat_template: bool = True,
    system_prompt: str | None = None,
) -> list[str]:
    """Turn user requests into model input strings.

    Args:
        tokenizer: the model's tokenizer.
        prompts: user requests, one string each.
        chat_template: apply the tokenizer's chat template with the generation prompt (default), or
            use the paper's raw format ``PAPER_PREFIX + prompt``.
        system_prompt: an optional system message (chat template only).

    Returns:
        One string per prompt, ready for :func:`tokenize_left_padded`.

    Raises:
        ValueError: ``prompts`` is a bare string or empty, or ``chat_template=True`` on a tokenizer
            without a template.
    """
    if isinstance(prompts, str):
        raise InputError("prompts must be a list of strings, not one string; wrap it: [prompt].")
    if len(prompts) == 0:
        raise InputError("prompts is empty; pass at least one request.")
    if not chat_template:
        if system_prompt is not None:
            raise InputError("system_prompt needs chat_template=True; the paper's raw format has no system turn.")
        return [PAPER_PREFIX + p for p in prompts]
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            "This tokenizer has no chat template; pass chat_template=False to use the paper's raw format."
        )
    out = []
    for p in prompts:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": p})
        out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


def tokenize_left_padded(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    add_special_tokens: bool = False,
    device: str | torch.device = "cpu",
) -> BatchEncoding:
    """Tokenize a batch with left padding, so every row's last real token sits in the last column.

    Args:
        tokenizer: the model's tokenizer; a missing pad token is set to eos (the paper's convention).
        texts: formatted inputs.
        add_special_tokens: False for chat-templated text (the template already holds its special
            tokens); True for raw text whose tokenizer adds BOS.
        device: where to put the tensors.

    Returns:
        ``input_ids`` and ``attention_mask``, both ``Int[Tensor, "batch pos"]``.
    """
    return tokenize_padded(tokenizer, texts, "left", add_special_tokens, device)


def tokenize_padded(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    padding_side: Literal["left", "right"],
    add_special_tokens: bool = False,
    device: str | torch.device = "cpu",
) -> BatchEncoding:
    """Tokenize a batch padded on ``padding_side`` whatever the tokenizer's own setting says.

    Generation needs left padding; reading activations works with either side as long as positions come
    from the attention mask. Arguments and return as :func:`tokenize_left_padded`.

    Raises:
        ValueError: ``padding_side`` is neither "left" nor "right".
    """
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right'; got {padding_side!r}.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(
        list(texts), return_tensors="pt", padding=True, padding_side=padding_side, add_special_tokens=add_special_tokens
    )
    return enc.to(device)
