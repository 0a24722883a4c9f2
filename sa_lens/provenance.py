"""Names that results files and vector sidecars record for models and data: never a machine's own paths.

A hub id (``meta-llama/Llama-2-7b-chat-hf``) is kept as it is. A local file or folder is named by its last two
path components (``lab/aligned-a788d77ac55843a9``, ``advbench/harmful_behaviors.csv``): enough to tell the
lab's content-addressed models and the public sets apart, and the same on every machine, so files written on
one machine compare equal on another and leak no home directories.
"""

from __future__ import annotations

import os
from pathlib import PurePath
from typing import Any

from sa_lens.bridge import is_bridge

__all__ = ["model_name", "portable_name"]


def portable_name(value: str | os.PathLike) -> str:
    """``value`` without its machine-specific part: a path (absolute, or one that exists here) becomes its last
    two components; anything else (a hub id, a label) is returned unchanged."""
    text = os.fspath(value)
    if not (os.path.isabs(text) or os.path.exists(text)):
        return text
    return PurePath(*PurePath(text).parts[-2:]).as_posix()


def model_name(model: Any) -> str:
    """The portable name of a bridge or Hugging Face model (its ``_name_or_path``), or its class name."""
    if is_bridge(model):
        model = model.original_model
    name = getattr(getattr(model, "config", None), "_name_or_path", "")
    return portable_name(name) if name else type(model).__name__
