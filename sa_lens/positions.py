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
from dataclasses import dataclass

import torch
from jaxtyping import Bool
from torch import Tensor

__all__ = ["GenerationPasses", "generated_mask", "prompt_length"]

@dataclass
class GenerationPasses:
    """The running generation's padded prompt length and how many forward passes it has started."""

    prompt_length: int
    passes: int = 0

    def start_pass(self, *_: object) -> None:
        """Count one forward pass (a forward pre-hook on the generating model calls it)."""
        self.passes += 1


_GENERATION: ContextVar[GenerationPasses | None] = ContextVar("sa_lens_generation", default=None)


@contextlib.contextmanager
def prompt_length(n: int, model: torch.nn.Module | None = None) -> Iterator[GenerationPasses]:
    """Declare the padded prompt length of the generation running inside the block.

    Args:
        n: the padded prompt length, in tokens.
        model: the generating model; its forward passes are counted (a pre-hook, removed on exit), so a
            one-token prompt's cached decode steps are told from its prompt pass.

    Yields:
        The pass counter.
    """
    token = _GENERATION.set(state := GenerationPasses(n))
    handle = model.register_forward_pre_hook(state.start_pass) if model is not None else None
    try:
        yield state
    finally:
        if handle is not None:
            handle.remove()
        _GENERATION.reset(token)


def generated_mask(seq_len: int, device: torch.device | str = "cpu") -> Bool[Tensor, " pos"]:
    """True at the columns of the current forward pass that hold generated tokens.

    Outside ``sa_lens.generate`` every position is prompt (a plain forward pass). Inside it, pass p (from 0)
    of a prompt of n tokens is a full pass when it holds n + p tokens — the prompt pass, or a step without the
    KV cache: columns ≥ n are generated — and a cached decode step when it holds fewer: all generated. Counting
    passes is what tells a one-token prompt's cached steps (1 token each) from its prompt pass.
    """
    state = _GENERATION.get()
    if state is None:
        return torch.zeros(seq_len, dtype=torch.bool, device=device)
    n, p = state.prompt_length, max(state.passes - 1, 0)
    if seq_len >= n + p:
        return torch.arange(seq_len, device=device) >= n
    return torch.ones(seq_len, dtype=torch.bool, device=device)
