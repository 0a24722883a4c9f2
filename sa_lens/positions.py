"""Which positions of a forward pass are prompt and which are generated, while ``sa_lens.generate`` runs.

A hook sees ``[batch, pos, d]``. With the KV cache on, generation runs the whole (left-padded) prompt once
and then one position per step; with it off, every step recomputes prompt + generated-so-far. Knowing
the padded prompt length is enough to label every column the same way in both modes, which is what makes
"steer only the prompt / only the generated tokens" identical with and without the cache (the bug every
steering library shipped at least once: anchors.md §4.5).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from jaxtyping import Bool
from torch import Tensor

__all__ = ["generated_mask", "prompt_length"]

_PROMPT_LENGTH: ContextVar[int | None] = ContextVar("sa_lens_prompt_length", default=None)


@contextlib.contextmanager
def prompt_length(n: int) -> Iterator[None]:
    """Declare the padded prompt length of the generation running inside the block."""
    token = _PROMPT_LENGTH.set(n)
    try:
        yield
    finally:
        _PROMPT_LENGTH.reset(token)


def generated_mask(seq_len: int, device: torch.device | str = "cpu") -> Bool[Tensor, " pos"]:
    """True at the columns of the current forward pass that hold generated tokens.

    Outside ``sa_lens.generate`` every position is prompt (a plain forward pass). Inside it, a pass at
    least as long as the prompt is a full pass (prompt pass, or a no-cache step): columns ≥ the prompt
    length are generated; a shorter pass is a cached decode step: all generated. The one ambiguous
    case, a one-token prompt with the cache on, reads its decode steps as full passes.
    """
    n = _PROMPT_LENGTH.get()
    if n is None:
        return torch.zeros(seq_len, dtype=torch.bool, device=device)
    if seq_len >= n:
        return torch.arange(seq_len, device=device) >= n
    return torch.ones(seq_len, dtype=torch.bool, device=device)
