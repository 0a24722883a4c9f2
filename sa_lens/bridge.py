"""Recognise a TransformerLens ``TransformerBridge`` without importing TransformerLens.

Importing ``transformer_lens`` costs seconds and pulls in ``datasets`` and pandas, so ``import sa_lens`` defers
it: modules that only annotate or type-test a bridge import the class under ``TYPE_CHECKING`` and call
:func:`is_bridge`. Code that builds a bridge (``sa_lens.load_model``) imports TransformerLens where it does so.
"""

from __future__ import annotations

import sys

__all__ = ["checkpoint_tokenizer", "is_bridge", "remember_checkpoint_tokenizer"]

# Set by sa_lens.load_model: the tokenizer as the checkpoint ships it, before TransformerLens re-creates it.
_CHECKPOINT_TOKENIZER = "_sa_lens_checkpoint_tokenizer"


def is_bridge(obj: object) -> bool:
    """Whether ``obj`` is a ``transformer_lens.model_bridge.TransformerBridge``.

    An instance can only exist once its class has been imported, so while ``transformer_lens.model_bridge`` is
    absent from ``sys.modules`` the answer is False and nothing is imported.
    """
    module = sys.modules.get("transformer_lens.model_bridge")
    return module is not None and isinstance(obj, module.TransformerBridge)


def remember_checkpoint_tokenizer(bridge: object, tokenizer: object) -> None:
    """Keep the checkpoint's own tokenizer on ``bridge`` (TransformerLens replaces ``bridge.tokenizer`` with a copy
    made with ``add_bos_token=True``), for what must be written or read as the checkpoint has it."""
    setattr(bridge, _CHECKPOINT_TOKENIZER, tokenizer)


def checkpoint_tokenizer(bridge: object):
    """The checkpoint's own tokenizer of a bridge loaded by ``sa_lens.load_model``; else ``bridge.tokenizer``."""
    return getattr(bridge, _CHECKPOINT_TOKENIZER, None) or bridge.tokenizer
