"""Batched text generation through a ``TransformerBridge``: chat template, left padding, KV cache, hooks on.

Which path, and why. Three paths exist for a bridge booted from a Hugging Face model:

1. ``bridge.generate`` (TransformerLens's own loop);
2. ``bridge.original_model.generate`` (Hugging Face's loop; the bridge's components sit inside the HF
   module tree, so every hook added with ``bridge.hooks(...)`` fires on it);
3. either of them with the KV cache off.

With transformers ≥ 5 the decoder layers hand the cache to attention as ``cache=`` while the bridge's
reimplemented attention (TransformerLens 4.3) reads ``past_key_values=``/``layer_past=``. The cache is
then never extended, each decode step attends only to itself, and greedy output turns to garbage after
the first token (measured on SmolLM2-135M: "Baking bread is…" became "B-----…"). Without the cache the
output is right but ~3× slower. :func:`enable_kv_cache` adds a forward pre-hook to every attention
component that passes the cache under the name the bridge reads; with it, path 2 equals Hugging Face's
own ``generate`` on the same weights token for token, with and without the cache, but ran at ~0.75×
its speed, the cost of the bridge's components on every step. During generation, the components no hook
needs therefore run as the modules they wrap (:func:`sa_lens.bypass.bypass_unhooked`), which gives back
Hugging Face's speed with the same values. We use path 2: it is right, fast, honours hooks, and is Hugging
Face's tested sampling code.

Where it stops, and what it reads. A checkpoint's ``generation_config`` often names one EOS while chat
turns end with another (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, ``<|end|>``), so generation
stops on both (:func:`stop_token_ids`). Every row starts with exactly one BOS where the tokenizer uses one,
whether the chat template writes it (Llama-2/3, Mistral, Gemma) or not (Phi-3), and on the paper's raw
format (:func:`sa_lens.prompts.tokenize_left_padded`). docs/model_families.md lists what is checked per family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sa_lens.bridge import checkpoint_tokenizer, is_bridge
from sa_lens.bypass import bypass_unhooked
from sa_lens.errors import InputError
from sa_lens.eval_mode import eval_mode
from sa_lens.positions import prompt_length
from sa_lens.prompts import end_of_turn_ids, format_prompts, tokenize_left_padded

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["enable_kv_cache", "generate", "generate_tokens", "stop_token_ids"]

_KV_FLAG = "_sa_lens_kv_cache_routed"


def _route_cache(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs["past_key_values"] = kwargs["cache"]
    return args, kwargs


def enable_kv_cache(bridge: TransformerBridge) -> TransformerBridge:
    """Make the bridge's attention components read the KV cache that transformers ≥ 5 passes as ``cache=``.

    Idempotent; a no-op on transformers versions that still pass ``past_key_values=``. It is a plain
    PyTorch pre-hook on each ``AttentionBridge``, not a TransformerLens hook, so ``reset_hooks()`` and
    ``bridge.hooks(...)`` leave it alone.

    Returns:
        The same bridge.
    """
    if getattr(bridge, _KV_FLAG, False):
        return bridge
    # A bridge exists, so TransformerLens is already imported; at module level it would slow `import sa_lens`.
    from transformer_lens.model_bridge.generalized_components.attention import (
        AttentionBridge,
    )

    for module in bridge.modules():
        if isinstance(module, AttentionBridge):
            module.register_forward_pre_hook(_route_cache, with_kwargs=True)
    setattr(bridge, _KV_FLAG, True)
    return bridge


def hf_and_tokenizer(
    model: TransformerBridge | PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The Hugging Face model to run (a bridge's own, with KV-cache routing on) and its tokenizer.

    For a bridge the tokenizer is the checkpoint's own (:func:`sa_lens.bridge.checkpoint_tokenizer`), not
    TransformerLens's copy made with ``add_bos_token=True``: what runs on the HF module then reads exactly what
    the same checkpoint reads in Hugging Face, lm-eval or vLLM.

    Raises:
        ValueError: a plain HF model without ``tokenizer``.
        TypeError: neither a bridge nor a ``PreTrainedModel``.
    """
    if is_bridge(model):
        enable_kv_cache(model)
        return model.original_model, tokenizer or checkpoint_tokenizer(model)
    if isinstance(model, PreTrainedModel):
        if tokenizer is None:
            raise InputError("A plain Hugging Face model needs its tokenizer: pass tokenizer=tok.")
        return model, tokenizer
    raise TypeError(f"Expected a TransformerBridge or a transformers PreTrainedModel, got {type(model).__name__}.")


def stop_token_ids(hf: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids generation stops on: ``generation_config.eos_token_id`` and every end-of-turn token of the
    tokenizer and its chat template (:func:`sa_lens.prompts.end_of_turn_ids`), without repeats."""
    eos = hf.generation_config.eos_token_id
    configured = [] if eos is None else eos if isinstance(eos, list) else [eos]
    return list(dict.fromkeys([*configured, *end_of_turn_ids(tokenizer)]))


@torch.inference_mode()
def generate_tokens(
    model: TransformerBridge | PreTrainedModel,
    texts: Sequence[str],
    max_new_tokens: int = 64,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    add_special_tokens: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Generate continuations of already formatted texts, as one left-padded batch (no sorting, no seeding).

    Args:
        model: a ``TransformerBridge`` (KV-cache routing is enabled on it) or a plain HF model.
        texts: formatted inputs (see :func:`sa_lens.prompts.format_prompts`).
        max_new_tokens: generation budget, in tokens.
        tokenizer: only for plain HF models.
        add_special_tokens: put the tokenizer's BOS in front of every row, exactly once also when the
            text already starts with it (default); False tokenizes the texts as they are.
        do_sample, temperature, top_k: sampling; greedy by default.
        use_cache: KV cache on (default) or off.

    Returns:
        The new token ids per row, cut after the first stop token (:func:`stop_token_ids`: the configured
        EOS and every end-of-turn token), which stays in the row.

    Raises:
        ValueError: a plain HF model without its tokenizer.
        TypeError: a model that is neither a bridge nor a ``PreTrainedModel``.
    """
    hf, tok = hf_and_tokenizer(model, tokenizer)
    stops = stop_token_ids(hf, tok)
    enc = tokenize_left_padded(tok, texts, add_special_tokens=add_special_tokens, device=hf.device)
    sampling: dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        sampling.update(temperature=temperature, top_k=top_k)
    else:
        # Greedy: clear sampling knobs a checkpoint's generation_config may carry, which would only warn.
        sampling.update(temperature=None, top_k=None, top_p=None)
    # Lets position-policy hooks tell prompt from generated columns, with and without the KV cache.
    # Eval mode for the call (a model left in train() would sample dropout), the caller's modes restored after.
    # Bridge components no hook needs run as the modules they wrap (sa_lens.bypass: HF's speed, the same values).
    bypass = bypass_unhooked(model) if is_bridge(model) else contextlib.nullcontext()
    with eval_mode(hf), prompt_length(enc["input_ids"].shape[1], hf), bypass:
        out = hf.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            use_cache=use_cache,
            pad_token_id=tok.pad_token_id,
            eos_token_id=stops or None,
            **sampling,
        )
    new = out[:, enc["input_ids"].shape[1] :]
    stop_set = set(stops)
    rows = []
    for row in new.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))
        rows.append(row[:cut])
    return rows


def generate(
    model: TransformerBridge | PreTrainedModel,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    *,
    batch_size: int = 16,
    chat_template: bool = True,
    system_prompt: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = 0,
    use_cache: bool = True,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool | str = False,
) -> list[str]:
    """Generate a reply to each user request, batched, with every active TransformerLens hook applied.

    Hooks added around the call (``with model.hooks(fwd_hooks=...)``) fire on the prompt pass and on
    every decode step; with the KV cache on, decode steps see one position at a time.

    Args:
        model: a ``TransformerBridge`` (or a plain HF model with ``tokenizer=``).
        prompts: user requests.
        max_new_tokens: generation budget, in tokens.
        batch_size: prompts per forward batch; prompts are sorted by length to cut padding and the
            replies returned in input order.
        chat_template: use the model's chat template (default) or the paper's raw format.
        system_prompt: optional system message.
        do_sample: greedy (False, default) or sampling; the paper's preset is do_sample=True,
            temperature=0.45, top_k=10, max_new_tokens=200 (paper-notes.md §4.2).
        temperature, top_k: sampling parameters.
        seed: seeds sampling: the same prompts, batch_size and seed give the same samples (a prompt's
            sample depends on its batch, since rows share one RNG stream). The caller's global RNG
            state, CPU and CUDA, is left as it was. None: unseeded, drawn from (and advancing) the caller's
            global RNG, so repeated calls give fresh samples.
        use_cache: KV cache on (default); off recomputes the whole prefix each step.
        tokenizer: only for plain HF models.
        progress: show a tqdm bar; a string is used as its label.

    Returns:
        The decoded continuations (special tokens removed), one per prompt, in input order.

    Raises:
        ValueError: empty prompts, a bare string, ``max_new_tokens < 1`` or ``batch_size < 1``.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise InputError(f"max_new_tokens and batch_size must be ≥ 1 (got {max_new_tokens}, {batch_size}).")
    _, tok = hf_and_tokenizer(model, tokenizer)
    texts = format_prompts(tok, prompts, chat_template=chat_template, system_prompt=system_prompt)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    replies: list[str] = [""] * len(texts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(batches, desc=progress if isinstance(progress, str) else "generate", disable=not progress, leave=False)
    # Seeded: a forked RNG, so the caller's stream is untouched. Unseeded: the caller's own stream, which advances,
    # so two calls draw different samples (a fork without a seed would replay the same draw on every call).
    with torch.random.fork_rng() if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        for idx in bar:
            rows = generate_tokens(
                model,
                [texts[i] for i in idx],
                max_new_tokens,
                tokenizer=tokenizer,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                use_cache=use_cache,
            )
            for i, row in zip(idx, rows):
                replies[i] = tok.decode(row, skip_special_tokens=True).strip()
    return replies
