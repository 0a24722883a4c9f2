"""Recognise a TransformerLens ``TransformerBridge`` without importing TransformerLens.

Importing ``transformer_lens`` costs seconds and pulls in ``datasets`` and pandas, so ``import sa_lens`` defers
it: modules that only annotate or type-test a bridge import the class under ``TYPE_CHECKING`` and call
:func:`is_bridge`. Code that builds a bridge (``sa_lens.load_model``) imports TransformerLens where it does so.
"""

from __future__ import annotations

import sys

__all__ = ["is_bridge"]


def is_bridge(obj: object) -> bool:
    """Whether ``obj`` is a ``transformer_lens.model_bridge.TransformerBridge``.

    An instance can only exist once its class has been imported, so while ``transformer_lens.model_bridge`` is
    absent from ``sys.modules`` the answer is False and nothing is imported.
    """
    module = sys.modules.get("transformer_lens.model_bridge")
    return module is not None and isinstance(obj, module.TransformerBridge)
