"""What a checkpoint parameter name says: its transformer layer and its kind (attention, MLP, embeddings, norms).

Harm vectors are keyed by checkpoint names (``model.layers.3.mlp.down_proj.weight``), so restricting τH to
some layers or kinds (the EDIT scenario, paper-notes.md §2.4 and §7.6) is a question about names only. The
patterns cover the Llama/Mistral/Qwen/Gemma (``model.layers.N``), GPT-2 (``transformer.h.N``) and GPT-NeoX
(``gpt_neox.layers.N``) layouts.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Literal

from sa_lens.errors import InputError

__all__ = ["KINDS", "Kind", "layer_index", "parameter_kind", "select_names"]

Kind = Literal["attention", "mlp", "embeddings", "norms", "other"]
KINDS: tuple[Kind, ...] = ("attention", "mlp", "embeddings", "norms", "other")

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
# Checked in this order: "post_attention_layernorm" is a norm, not attention, so norms come first.
_KIND_PATTERNS: tuple[tuple[Kind, re.Pattern[str]], ...] = (
    ("norms", re.compile(r"(?:norm|ln_\w+|ln_f)\.(?:weight|bias)$")),
    ("embeddings", re.compile(r"(?:embed_tokens|embed_in|embed_out|wte|wpe|lm_head|embed_positions)\.")),
    ("attention", re.compile(r"\.(?:self_attn|attn|attention)\.")),
    ("mlp", re.compile(r"\.(?:mlp|feed_forward|block_sparse_moe)\.")),
)


def layer_index(name: str) -> int | None:
    """The transformer layer a parameter belongs to (``model.layers.3.…`` → 3), or None outside the layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def parameter_kind(name: str) -> Kind:
    """Classify a checkpoint parameter name as attention, MLP, embeddings (incl. ``lm_head``), norms or other."""
    for kind, pattern in _KIND_PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


def select_names(
    names: Iterable[str], layers: Collection[int] | None = None, kinds: Collection[str] | None = None
) -> list[str]:
    """Keep the names in the given layers and of the given kinds (None = no restriction on that axis).

    A name outside the transformer layers (embeddings, final norm) is dropped by any ``layers`` restriction:
    the paper's edit area (Eqs. 11–13, paper-notes.md §2.4) is a set of decoder layers.

    Raises:
        ValueError: an unknown kind, or a negative layer index.
    """
    if kinds is not None:
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise InputError(f"Unknown parameter kind(s) {unknown}; choose from {list(KINDS)}.")
    if layers is not None and any(not isinstance(i, int) or i < 0 for i in layers):
        raise InputError(f"layers must be non-negative layer indices; got {sorted(layers, key=str)}.")
    return [
        n
        for n in names
        if (layers is None or layer_index(n) in layers) and (kinds is None or parameter_kind(n) in kinds)
    ]
