"""What a checkpoint parameter name says: its transformer layer, its kind and its attention projection.

Harm vectors are keyed by checkpoint names (``model.layers.3.mlp.down_proj.weight``), so restricting τH to
some layers or kinds (the EDIT scenario, paper-notes.md §2.4 and §7.6) and splitting it per layer or head
(:mod:`sa_lens.analysis.weights`) are questions about names only; this module is the one place that reads
them. The patterns cover the Llama/Mistral/Qwen/Gemma/Phi-3 (``model.layers.N``), GPT-2 (``transformer.h.N``)
and GPT-NeoX (``gpt_neox.layers.N``) layouts, the same names as a TransformerBridge lists them (with
``._original_component`` after each wrapped module), and the language model of a multimodal checkpoint
(``model.language_model.layers.N``). A vision or audio tower and its projector (``vision_tower…layers.N``,
``visual.blocks.N``) are kind ``"tower"`` and outside the layers: their blocks are not the decoder's.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Literal

from sa_lens.errors import InputError

__all__ = ["KINDS", "Kind", "Projection", "attention_projection", "checkpoint_name", "is_mlp_output_projection",
           "layer_count", "layer_index", "parameter_kind", "select_names"]

Kind = Literal["attention", "mlp", "embeddings", "norms", "tower", "other"]
KINDS: tuple[Kind, ...] = ("attention", "mlp", "embeddings", "norms", "tower", "other")
Projection = Literal["q", "k", "v", "o"]

# A bridge wraps every HF module and lists its parameters under "<module>._original_component.<param>".
_BRIDGE_WRAPPER = "._original_component"
_TOWER = re.compile(
    r"(?:^|\.)(?:vision_tower|vision_model|visual|vision_encoder|vision_embed_tokens|image_encoder|audio_tower"
    r"|multi_modal_projector|mm_projector|connector)\."
)
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_ATTENTION = r"\.(?:self_attn|attn|attention|self_attention)\."
# Checked in this order: "post_attention_layernorm" is a norm, not attention, so norms come first.
_KIND_PATTERNS: tuple[tuple[Kind, re.Pattern[str]], ...] = (
    ("norms", re.compile(r"(?:norm|ln_\w+)\.(?:weight|bias)$")),
    ("embeddings", re.compile(r"(?:embed_tokens|embed_in|embed_out|wte|wpe|lm_head|embed_positions)\.")),
    ("attention", re.compile(_ATTENTION)),
    ("mlp", re.compile(r"\.(?:mlp|feed_forward|block_sparse_moe)\.")),
)
_PROJECTION = re.compile(_ATTENTION + r"(?:([qkvo])_proj|(dense))\.weight$")
# The matrix that writes an MLP's hidden activations back into the residual stream: Llama/Mistral/Qwen/Gemma/Phi-3
# ``mlp.down_proj``, GPT-2 ``mlp.c_proj`` (Conv1D), GPT-NeoX/Falcon ``mlp.dense_4h_to_h``, Phi-2 ``mlp.fc2``, OPT
# ``fc2`` directly under the layer, GPT-J ``mlp.fc_out``. A mixture of experts has one per expert
# (``experts.N.w2``), so no single matrix is "the" MLP output there.
_MLP_OUTPUT = re.compile(
    r"\.(?:(?:mlp|feed_forward)\.(?:down_proj|c_proj|dense_4h_to_h|fc2|fc_out)|fc2)\.weight$"
)


def checkpoint_name(name: str) -> str:
    """A bridge parameter's name as in the checkpoint (the bridge inserts ``._original_component``)."""
    return name.replace(_BRIDGE_WRAPPER, "")


def layer_index(name: str) -> int | None:
    """The decoder layer a parameter belongs to (``model.layers.3.…`` → 3), or None outside the layers.

    None as well for a vision/audio tower's blocks: ``vision_tower.encoder.layers.3`` is not decoder layer 3.
    """
    name = checkpoint_name(name)
    if _TOWER.search(name):
        return None
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_count(names: Iterable[str]) -> int:
    """The number of decoder layers the parameter names span (highest layer index + 1; 0 without layers)."""
    return max((i for i in map(layer_index, names) if i is not None), default=-1) + 1


def parameter_kind(name: str) -> Kind:
    """Classify a parameter name as attention, MLP, embeddings (incl. ``lm_head``), norms, tower or other.

    ``"tower"`` is every parameter of a multimodal checkpoint's vision/audio tower and of its projector into
    the language model, whatever its role inside the tower.
    """
    name = checkpoint_name(name)
    if _TOWER.search(name):
        return "tower"
    for kind, pattern in _KIND_PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


def attention_projection(name: str) -> Projection | None:
    """Which per-head-sliceable attention matrix a decoder weight is: ``"q"``, ``"k"``, ``"v"``, ``"o"`` or None.

    Only separate ``nn.Linear`` weights in HF's ``[out, in]`` layout have a role: ``{q,k,v,o}_proj`` and
    GPT-NeoX's ``attention.dense`` (= o). Fused q/k/v matrices (Phi-3's ``qkv_proj``, GPT-NeoX's
    ``query_key_value``) and GPT-2's ``Conv1D`` ``c_attn`` / ``c_proj`` (stored ``[in, out]``) get None, as do
    biases and tower weights: slicing them by head rows/columns would mix heads.
    """
    name = checkpoint_name(name)
    if layer_index(name) is None:
        return None
    m = _PROJECTION.search(name)
    if not m:
        return None
    return m.group(1) or "o"


def is_mlp_output_projection(name: str) -> bool:
    """Whether a decoder weight is its layer's MLP output projection (what ROME edits: Meng et al. 2022, §3).

    True for ``model.layers.5.mlp.down_proj.weight``, ``transformer.h.5.mlp.c_proj.weight`` (GPT-2's attention
    ``attn.c_proj`` is not), ``gpt_neox.layers.5.mlp.dense_4h_to_h.weight``, OPT's ``model.decoder.layers.5.fc2.weight``;
    False outside the decoder layers and for the experts of a mixture of experts.
    """
    name = checkpoint_name(name)
    return layer_index(name) is not None and parameter_kind(name) in ("mlp", "other") and bool(_MLP_OUTPUT.search(name))


def select_names(
    names: Iterable[str], layers: Collection[int] | None = None, kinds: Collection[str] | None = None
) -> list[str]:
    """Keep the names in the given layers and of the given kinds (None = no restriction on that axis).

    A name outside the transformer layers (embeddings, final norm, a vision tower) is dropped by any
    ``layers`` restriction: the paper's edit area (Eqs. 11–13, paper-notes.md §2.4) is a set of decoder layers.

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
