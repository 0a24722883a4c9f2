"""Activation patching and ablation of attention heads' outputs (``blocks.{l}.attn.hook_z``, one head at a time).

Why not ``transformer_lens.patching``: its setters patch every position of two token batches of equal
shape. Harmful and harmless requests differ in length, so here a head's output is patched only at the
last ``n_positions`` positions — the chat template's post-instruction tokens, identical on both runs and
aligned by left padding — from the paired source prompt (Arditi et al. 2024 patch the same positions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sa_lens.analysis.capture import LOGITS_HOOK, encode
from sa_lens.analysis.logit_diff import TokenSets, logit_diff
from sa_lens.model_state import in_analysis_state

__all__ = ["attribution_patch", "patch_heads"]

Head = tuple[int, int]


def attribution_patch(
    source_z: Float[Tensor, "n k n_layers n_heads d_head"],
    receiver_z: Float[Tensor, "n k n_layers n_heads d_head"],
    receiver_grad: Float[Tensor, "n k n_layers n_heads d_head"],
) -> Float[Tensor, "n_layers n_heads"]:
    """First-order estimate of patching each head's output from source into receiver, mean over pairs, in logits.

    Δmetric ≈ (z_source − z_receiver) · ∂metric/∂z_receiver, summed over the patched positions and d_head
    (attribution patching, Nanda 2023; Syed et al. 2023). One backward pass gives every head.
    """
    return ((source_z - receiver_z) * receiver_grad).sum(dim=(1, 4)).mean(0)


@in_analysis_state
@torch.no_grad()
def patch_heads(
    model: TransformerBridge,
    receiver_prompts: Sequence[str],
    source_z: Float[Tensor, "n k n_layers n_heads d_head"],
    heads: Sequence[Head],
    sets: TokenSets,
    receiver_logit_diff: Float[Tensor, " n"],
    batch_size: int = 8,
) -> dict[Head, float]:
    """Exact activation patching: replace one head's output on the receiver run by the source run's, per head.

    Args:
        model: the bridge.
        receiver_prompts: requests of the receiving run (row i is paired with ``source_z[i]``).
        source_z: the source run's ``hook_z`` at the last k positions (from :func:`sa_lens.analysis.capture.capture`).
        heads: ``(layer, head)`` pairs to patch, one at a time.
        sets: tokens of the logit difference.
        receiver_logit_diff: the unpatched receiver's logit difference per prompt.
        batch_size: prompts per pass.

    Returns:
        ``{(layer, head): mean change of the logit difference, in logits}`` (logits before final soft-capping,
        as :func:`~sa_lens.analysis.capture.capture` reads them). Runs in eval mode, the caller's mode restored.

    Raises:
        ValueError: hooks left on the model (:func:`sa_lens.model_state.analysis_state`).
    """
    k = source_z.shape[1]
    out: dict[Head, float] = {}
    for layer, head in heads:
        total = 0.0
        for start in range(0, len(receiver_prompts), batch_size):
            enc = encode(model, receiver_prompts[start : start + batch_size])
            src = source_z[start : start + batch_size, :, layer, head].to(model.cfg.device)

            def put(z: Tensor, hook, src: Tensor = src, head: int = head) -> Tensor:
                z = z.clone()
                z[:, -k:, head] = src.to(z.dtype)
                return z

            seen: dict[str, Tensor] = {}
            hooks = [(f"blocks.{layer}.attn.hook_z", put),
                     (LOGITS_HOOK, lambda x, hook, seen=seen: seen.__setitem__("logits", x))]
            with model.hooks(fwd_hooks=hooks):
                model(enc["input_ids"], attention_mask=enc["attention_mask"])
            total += float((logit_diff(seen["logits"][:, -1], sets).cpu() - receiver_logit_diff[start : start + batch_size]).sum())
        out[(layer, head)] = total / len(receiver_prompts)
    return out


