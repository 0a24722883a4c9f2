"""Safe-Align injection: named TransformerLens hooks that steer each layer's MLP output away from the ICV.

Formula (official code, paper-notes.md §3.2 and §7.4), per token with m the MLP output and v the
layer's ICV (pointing from safe to unsafe)::

    c  = 0.1 · α · (1 + max(0, cos(m, v)))
    m' = ‖m‖ · normalize(m/‖m‖ − c · v/‖v‖)

The push grows when m already leans toward the unsafe direction (the cosine gate), and the output
keeps its norm. It applies at every position, prompt and generated tokens alike, as the official
module wrapper does; with the KV cache on, each decode step sees its one new position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from sa_lens.safety_vector import SafetyVector

__all__ = ["DEFAULT_ALPHA", "OFFICIAL_FACTOR", "inject_official", "safety_hooks"]

DEFAULT_ALPHA = 0.12  # paper A.6 and the official notebooks
OFFICIAL_FACTOR = 0.1  # the code's extra factor, not in the paper (paper-notes.md §7.4)
INJECT_HOOK = "blocks.{layer}.hook_mlp_out"

HookFn = Callable[..., Tensor]


def inject_official(
    m: Float[Tensor, "batch pos d_model"], v: Float[Tensor, "d_model"], alpha: float
) -> Float[Tensor, "batch pos d_model"]:
    """Apply the official norm-preserving, cosine-gated step away from ``v`` (see module docstring).

    Computed in fp32 and cast back to ``m``'s dtype; zero vectors stay zero.
    """
    mf = m.float()
    v_unit = torch.nn.functional.normalize(v.float().to(m.device), dim=-1)
    norm = mf.norm(dim=-1, keepdim=True)
    m_unit = mf / norm.clamp_min(torch.finfo(torch.float32).tiny)
    cos = (m_unit * v_unit).sum(-1, keepdim=True)
    c = OFFICIAL_FACTOR * alpha * (1 + cos.clamp_min(0))
    steered = torch.nn.functional.normalize(m_unit - c * v_unit, dim=-1) * norm
    return steered.to(m.dtype)


def safety_hooks(
    sv: SafetyVector, alpha: float = DEFAULT_ALPHA, layers: Sequence[int] | None = None
) -> list[tuple[str, HookFn]]:
    """Named forward hooks that inject the ICV into each chosen layer's MLP output (Safe-Align, paper §3.2).

    Use with ``with model.hooks(fwd_hooks=safety_hooks(sv)):`` around a forward pass or
    :func:`sa_lens.generate`; the hooks are gone when the block exits, also on error.

    Args:
        sv: the safety vector ``[n_layers, d_model]``.
        alpha: α, 0.12 by default (paper A.6); the effective step is 0.1·α·(1 + relu(cos)).
        layers: layer indices to steer; all by default (BASE/SFT), layers l−1..l+1 for EDIT.

    Returns:
        ``[(hook_name, fn), ...]`` with names ``blocks.{l}.hook_mlp_out``; each ``fn.__name__`` is
        ``sa_lens.safe_align.mlp_out.L{l}`` so ``model.list_hooks()``-style listings say what it is.

    Raises:
        ValueError: α not finite, or a layer index outside the vector.
    """
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}.")
    layers = list(range(sv.n_layers)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < sv.n_layers]
    if bad:
        raise ValueError(f"Layer indices {bad} are outside the safety vector's {sv.n_layers} layers.")
    hooks = []
    for layer in layers:
        v = sv.directions[layer]

        def fn(m: Tensor, hook: HookPoint, v: Tensor = v) -> Tensor:
            return inject_official(m, v, alpha)

        fn.__name__ = fn.__qualname__ = f"sa_lens.safe_align.mlp_out.L{layer}"
        hooks.append((INJECT_HOOK.format(layer=layer), fn))
    return hooks
