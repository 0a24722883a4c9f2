"""Prompt formats: the model's chat template, or the paper's raw query format; left-padded batches.

Source: paper-notes.md §4.2 — the official code feeds ``PAPER_PREFIX + question`` raw, with no chat
template, left-padded with pad = eos. Chat models are evaluated here with their template by default,
which is what their users run; ``chat_template=False`` gives the paper's raw format. Either way,
tokenized with ``add_special_tokens=True`` (as generation does), a row holds exactly one BOS where the
tokenizer uses one (a template that writes it is not doubled), and
:func:`end_of_turn_ids` reads from the template how an assistant turn ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

from sa_lens.errors import InputError

# Set on a bridge's tokenizer by keep_checkpoint_bos_rule: whether the checkpoint's own tokenizer adds a BOS.
_CHECKPOINT_ADDS_BOS = "_sa_lens_checkpoint_adds_bos"

PAPER_PREFIX = "Only provide answer of the given question and do not provide anything else. "

__all__ = ["PAPER_PREFIX", "end_of_turn_ids", "format_prompts", "keep_checkpoint_bos_rule", "token_ids", "tokenize_left_padded", "tokenize_padded"]

# Stands in for an assistant reply when rendering a template to see what it writes after one.
_REPLY = "sa_lens_reply_sentinel"


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
        ValueError: ``prompts`` is a bare string or empty, ``chat_template=True`` on a tokenizer
            without a template, or a template that refuses the messages (a system prompt on Gemma-2 or
            Mistral, whose templates have no system role).
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
    from jinja2 import TemplateError  # transformers renders templates with jinja2, so it is installed

    out = []
    for p in prompts:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": p})
        try:
            out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        except TemplateError as e:
            hint = " Gemma's and Mistral's templates have no system role: leave system_prompt out." if system_prompt else ""
            raise InputError(f"The model's chat template refused these messages: {e}.{hint}") from e
    return out


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token id that ends a reply: the tokenizer's EOS and the special tokens the chat template closes
    an assistant turn with (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, ``<|end|>``, ``</s>``, …).

    A checkpoint's ``generation_config`` often lists only one EOS (Meta-Llama-3-8B-Instruct's first upload
    stopped on ``<|end_of_text|>`` while each turn ends with ``<|eot_id|>``), so a generator that trusts it
    alone writes past the end of the turn. The template is the authority on how a turn ends: it is rendered
    with one user and one assistant message, and the special tokens between the reply and the end of the
    text are the turn's terminators.

    Returns:
        Distinct ids, the EOS first; the EOS alone when the template does not render an assistant's reply;
        empty when the tokenizer has neither an EOS nor a template.

    Raises:
        jinja2.TemplateError: a template that cannot render a user turn followed by an assistant turn
            (it could not format a generation prompt either).
    """
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _REPLY}]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        if _REPLY not in text:  # a template that renders no assistant turns says nothing of how one ends
            return ids
        tail = text[text.rindex(_REPLY) + len(_REPLY) :]
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        ids += [i for i in tokenizer(tail, add_special_tokens=False)["input_ids"] if i in special]
    return list(dict.fromkeys(ids))


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Each text's token ids, unpadded, with exactly one BOS where the tokenizer uses one.

    Every path that feeds formatted text to a model goes through here (generation, ICV reads, analyses,
    fine-tuning), so all of them see the tokens the model was trained on: chat templates that write the BOS
    themselves (Llama-2, Llama-3, Gemma, Mistral) and tokenizers that add it (Phi-3's template does not write
    it) would otherwise give two, or none.

    Args:
        tokenizer: the model's tokenizer.
        texts: formatted inputs (chat-templated or raw).
        add_special_tokens: add the tokenizer's own special tokens (its BOS), never doubling a BOS the text
            already starts with, and on a bridge loaded by :func:`sa_lens.load_model` only where the
            checkpoint's own tokenizer adds one (:func:`keep_checkpoint_bos_rule`), so a bridge and the plain
            HF model get the same ids; False leaves the text's tokens as they are.

    Returns:
        One list of ids per text.
    """
    rows = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    bos = tokenizer.bos_token_id
    if not (add_special_tokens and bos is not None):
        return rows
    checkpoint_adds_bos = getattr(tokenizer, _CHECKPOINT_ADDS_BOS, True)
    out = []
    for text, row in zip(texts, rows):
        written = text.startswith(tokenizer.bos_token)
        if row[:2] == [bos, bos] and written:
            row = row[1:]  # the template's BOS and the tokenizer's: keep one, as the model saw in training
        elif row[:1] == [bos] and not written and not checkpoint_adds_bos:
            row = row[1:]  # a BOS only the bridge's tokenizer adds (TransformerLens), never the checkpoint's own
        out.append(row)
    return out


def keep_checkpoint_bos_rule(
    bridge_tokenizer: PreTrainedTokenizerBase, checkpoint_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Make :func:`token_ids` add a BOS to ``bridge_tokenizer``'s inputs only where the checkpoint's tokenizer does.

    TransformerLens re-creates a bridge's tokenizer with ``add_bos_token=True`` whatever the checkpoint says,
    so raw text on a bridge would start with a BOS that the same checkpoint loaded in Hugging Face never sees
    (SmolLM2 and Qwen2 add none; SmolLM2's BOS is its ``<|im_start|>`` turn marker). The rule is read from the
    checkpoint's own tokenizer and kept on the bridge's tokenizer object; TransformerLens's own ``to_tokens``
    is left as it is.
    """
    bos = checkpoint_tokenizer.bos_token_id
    adds = bos is not None and checkpoint_tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]
    setattr(bridge_tokenizer, _CHECKPOINT_ADDS_BOS, adds)


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
        add_special_tokens: add the tokenizer's own special tokens (its BOS), never doubling a BOS the text
            already starts with (chat templates such as Llama-2's, Llama-3's and Gemma's write it); False
            leaves the text's tokens as they are.
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
        ValueError: ``padding_side`` is neither "left" nor "right", ``texts`` is empty, or a text has no tokens.
    """
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right'; got {padding_side!r}.")
    if len(texts) == 0:
        raise InputError("texts is empty; pass at least one text to tokenize.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = token_ids(tokenizer, texts, add_special_tokens)
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise InputError(f"text {empty[0]} ({texts[empty[0]]!r}) has no tokens (and this tokenizer adds no BOS); "
                         "give every row some text.")
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return BatchEncoding({"input_ids": ids, "attention_mask": mask}).to(device)
