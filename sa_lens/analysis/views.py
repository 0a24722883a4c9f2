"""Interactive views (circuitsvis) of where the harm direction shows up: top heads' attention, per-token projection.

Each function returns a circuitsvis ``RenderedHTML`` that a notebook displays inline; :func:`save_html` writes
several of them into one standalone page with circuitsvis's JavaScript inlined, so it opens offline.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import circuitsvis as cv
import torch
from circuitsvis.utils.render import RenderedHTML
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sa_lens.errors import InputError
from sa_lens.model_state import in_analysis_state
from sa_lens.prompts import format_prompts, tokenize_left_padded
from sa_lens.safety_vector import SafetyVector

__all__ = ["attention_view", "projection_view", "save_html"]


def _run(model: TransformerBridge, prompt: str, hook_names: Sequence[str]) -> tuple[list[str], dict[str, Tensor]]:
    """One chat-templated prompt (no padding) through the model; returns its token strings and the hooked tensors."""
    text = format_prompts(model.tokenizer, [prompt])[0]
    ids = tokenize_left_padded(model.tokenizer, [text], add_special_tokens=True, device=model.cfg.device)["input_ids"]
    store: dict[str, Tensor] = {}
    hooks = [(name, lambda x, hook, name=name: store.__setitem__(name, x.detach().float().cpu())) for name in hook_names]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(ids)
    return [model.tokenizer.decode([t]) for t in ids[0].tolist()], store


@in_analysis_state
def attention_view(model: TransformerBridge, prompt: str, heads: Sequence[tuple[int, int]]) -> RenderedHTML:
    """Attention patterns of the given heads on one request (chat template applied), as circuitsvis tabs.

    Args:
        model: the bridge.
        prompt: a user request.
        heads: ``(layer, head)`` pairs, e.g. ``sa_lens.analysis.top_heads(df, "dla_diff")``.

    Returns:
        ``circuitsvis.attention.attention_heads`` over the heads, named ``L{layer}H{head}``.

    Raises:
        ValueError: no heads, a head outside the model, or hooks left on it (:mod:`sa_lens.model_state`; the
            pass runs in eval mode, the caller's mode restored).
    """
    if not heads:
        raise InputError("attention_view needs at least one (layer, head).")
    bad = [(l, h) for l, h in heads if not (0 <= l < model.cfg.n_layers and 0 <= h < model.cfg.n_heads)]
    if bad:
        raise InputError(f"Heads {bad} are outside the model ({model.cfg.n_layers} layers × {model.cfg.n_heads} heads).")
    layers = sorted({l for l, _ in heads})
    tokens, store = _run(model, prompt, [f"blocks.{l}.attn.hook_pattern" for l in layers])
    patterns = torch.stack([store[f"blocks.{l}.attn.hook_pattern"][0, h] for l, h in heads])  # [heads, q, k]
    return cv.attention.attention_heads(attention=patterns, tokens=tokens,
                                           attention_head_names=[f"L{l}H{h}" for l, h in heads])


@in_analysis_state
def projection_view(
    model: TransformerBridge,
    prompt: str,
    direction: SafetyVector | Float[Tensor, "n_layers d_model"],
    layers: Sequence[int] | None = None,
) -> RenderedHTML:
    """Each token's residual stream (``resid_post``) projected on the unit direction of each chosen layer.

    Args:
        model: the bridge.
        prompt: a user request (chat template applied, so the post-instruction tokens show too).
        direction: the safety/harm direction, ``[n_layers, d_model]`` (harmful − harmless).
        layers: layers shown as selectable value sets (default: every third layer and the last).

    Returns:
        ``circuitsvis.tokens.colored_tokens_multi``; values in residual-stream units, positive = toward harmful.

    Raises:
        ValueError: hooks left on the model (:mod:`sa_lens.model_state`; the pass runs in eval mode, the
            caller's mode restored).
    """
    d = direction.directions if isinstance(direction, SafetyVector) else torch.as_tensor(direction)
    d = d.float()
    n_layers = model.cfg.n_layers
    layers = list(layers) if layers is not None else sorted({*range(0, n_layers, 3), n_layers - 1})
    tokens, store = _run(model, prompt, [f"blocks.{l}.hook_resid_post" for l in layers])
    units = d[layers] / d[layers].norm(dim=-1, keepdim=True).clamp_min(1e-12)
    values = torch.stack([store[f"blocks.{l}.hook_resid_post"][0] @ units[i] for i, l in enumerate(layers)], dim=1)
    return cv.tokens.colored_tokens_multi(tokens=tokens, values=values, labels=[f"resid_post L{l}" for l in layers])


def save_html(views: Mapping[str, RenderedHTML], path: str | Path, title: str = "sa_lens views") -> Path:
    """Write several views into one standalone HTML page (circuitsvis JavaScript inlined: works offline).

    Args:
        views: ``{heading: view}`` in page order.
        path: output ``.html`` file; parents are created.
        title: page title.

    Returns:
        The path written.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
             f"<body style='font-family: sans-serif'><h1>{html.escape(title)}</h1>"]
    for heading, view in views.items():
        parts.append(f"<h2>{html.escape(heading)}</h2>{view.local_src}")
    parts.append("</body></html>")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
