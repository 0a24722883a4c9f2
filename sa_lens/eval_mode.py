"""Eval mode for one call, each module's own mode given back after: the rule every sa_lens pass keeps.

A model left in ``train()`` runs dropout, so generated replies, multiple-choice scores, activations and vectors
would be random draws. Generation, multiple choice and every analysis (:mod:`sa_lens.model_state`) run inside
:func:`eval_mode`; on exit each module's ``training`` flag is put back as it was (per module, so a partly frozen
model keeps its mix), also when the block raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run the block with every module of ``model`` in eval mode; restore each module's mode on exit.

    Nesting is safe (an inner block finds eval mode and restores eval mode; the outer one restores the caller's).

    Yields:
        The same model.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
