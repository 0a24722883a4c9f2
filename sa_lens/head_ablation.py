"""Attention heads' outputs (``blocks.{l}.attn.hook_z``) replaced by zero or a given mean, as named hooks.

The mechanism under :class:`sa_lens.interventions.HeadAblation` and the head analyses (Wang et al. 2022 mean
ablation; zero ablation removes what a head writes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from jaxtyping import Float
from torch import Tensor

from sa_lens.models import DeviceCopies, hook_point_device

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["Head", "ablate_heads_hooks"]

Head = tuple[int, int]


def ablate_heads_hooks(
    heads: Sequence[Head],
    mean_z: Float[Tensor, "n_layers n_heads d_head"] | None = None,
    *,
    model: TransformerBridge | None = None,
) -> list[tuple[str, Callable]]:
    """Named hooks that ablate the given heads' outputs at every position (zero, or a given mean).

    Zero-ablation removes what a head writes; mean-ablation (``mean_z``, e.g. over harmless prompts)
    keeps its average contribution and removes only the prompt-specific part. Use as
    ``with model.hooks(fwd_hooks=ablate_heads_hooks(heads)):`` around a forward pass or generation.

    Args:
        heads: ``(layer, head)`` pairs.
        mean_z: the value written into each ablated head, ``[n_layers, n_heads, d_head]``; None writes zeros.
        model: the bridge the hooks are for; when given, each layer's means are placed once, in the model's
            dtype, on the device of that layer's ``hook_z`` (its GPU when the model spans several). Without it,
            the first call places them on the activations' device and dtype. Either way later calls copy nothing.

    Returns:
        ``[("blocks.{l}.attn.hook_z", fn), ...]`` with one hook per layer; ``fn.__name__`` is
        ``sa_lens.head_ablation.L{l}``.
    """
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    hooks = []
    for layer, hs in sorted(by_layer.items()):
        hook_name = f"blocks.{layer}.attn.hook_z"
        means = None
        if mean_z is not None:
            # The activations' dtype is the model's; the rows are taken once here, not indexed on every call.
            where = None if model is None else hook_point_device(model, hook_name)
            means = DeviceCopies(mean_z[layer, hs], None if model is None else model.cfg.dtype, where)

        def fn(z: Tensor, hook, hs: list[int] = hs, means: DeviceCopies | None = means) -> Tensor:
            z = z.clone()
            z[:, :, hs] = 0.0 if means is None else means.on(z.device, z.dtype)
            return z

        fn.__name__ = fn.__qualname__ = f"sa_lens.head_ablation.L{layer}"
        hooks.append((hook_name, fn))
    return hooks
