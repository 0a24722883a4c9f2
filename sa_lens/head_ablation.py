"""Attention heads' outputs (``blocks.{l}.attn.hook_z``) replaced by zero or a given mean, as named hooks.

The mechanism under :class:`sa_lens.interventions.HeadAblation` and the head analyses (Wang et al. 2022 mean
ablation; zero ablation removes what a head writes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jaxtyping import Float
from torch import Tensor

__all__ = ["Head", "ablate_heads_hooks"]

Head = tuple[int, int]


def ablate_heads_hooks(heads: Sequence[Head], mean_z: Float[Tensor, "n_layers n_heads d_head"] | None = None) -> list[tuple[str, Callable]]:
    """Named hooks that ablate the given heads' outputs at every position (zero, or a given mean).

    Zero-ablation removes what a head writes; mean-ablation (``mean_z``, e.g. over harmless prompts)
    keeps its average contribution and removes only the prompt-specific part. Use as
    ``with model.hooks(fwd_hooks=ablate_heads_hooks(heads)):`` around a forward pass or generation.

    Returns:
        ``[("blocks.{l}.attn.hook_z", fn), ...]`` with one hook per layer; ``fn.__name__`` is
        ``sa_lens.head_ablation.L{l}``.
    """
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    hooks = []
    for layer, hs in sorted(by_layer.items()):

        def fn(z: Tensor, hook, hs: list[int] = hs, layer: int = layer) -> Tensor:
            z = z.clone()
            z[:, :, hs] = 0.0 if mean_z is None else mean_z[layer, hs].to(z.device, z.dtype)
            return z

        fn.__name__ = fn.__qualname__ = f"sa_lens.head_ablation.L{layer}"
        hooks.append((f"blocks.{layer}.attn.hook_z", fn))
    return hooks
