"""One instrumented pass over a prompt set: what head tracing reads from the model, at the last positions.

Per prompt (chat-templated, left-padded, mask-derived positions): the residual entering block 0, every
head's ``hook_z`` at the last ``n_positions`` positions (and its gradient with respect to the
refusal-vs-compliance logit difference), every MLP's output, the scale of each block's post-attention norm
(Gemma-2's ``ln1_post``, where a block has one), the final residual and the final norm's scale at the last
position, and the logit difference itself, read from the unembedding's output: before final logit
soft-capping (Gemma-2's ``30·tanh(logits/30)``), which no sum of components passes through linearly. Everything else in ``sa_lens.analysis.heads`` is arithmetic
on these tensors, so harmful and harmless prompts cost one forward and one backward pass each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sa_lens.analysis.logit_diff import TokenSets, logit_diff
from sa_lens.errors import InputError
from sa_lens.model_state import in_analysis_state
from sa_lens.prompts import format_prompts, tokenize_left_padded

__all__ = ["LOGITS_HOOK", "Capture", "capture", "encode", "has_post_attention_norm", "post_instruction_length"]

# The unembedding's output: the logits before final soft-capping, equal to the model's logits without it.
LOGITS_HOOK = "unembed.hook_out"

_MARK = "\u2063sa_lens\u2063"  # a user message that cannot merge with the template around it


def post_instruction_length(tokenizer) -> int:
    """Number of template tokens after the user's message (``<|im_end|>\\n<|im_start|>assistant\\n`` = 5 for ChatML).

    These positions hold the same tokens on every prompt, so a harmful and a harmless run line up
    there although their lengths differ; the refusal-direction work finds refusal is decided there
    (Arditi et al. 2024).

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    text = format_prompts(tokenizer, [_MARK])[0]
    suffix = text[text.index(_MARK) + len(_MARK):]
    return max(1, len(tokenizer.encode(suffix, add_special_tokens=False)))


def encode(model: TransformerBridge, prompts: Sequence[str]):
    """Chat-templated, left-padded encoding of user requests on the model's device."""
    texts = format_prompts(model.tokenizer, list(prompts))
    return tokenize_left_padded(model.tokenizer, texts, add_special_tokens=True, device=model.cfg.device)


def has_post_attention_norm(model: TransformerBridge) -> bool:
    """Whether each block normalises its attention output before adding it to the residual (Gemma-2's ``ln1_post``)."""
    return "blocks.0.ln1_post.hook_scale" in model.hook_dict


@dataclass
class Capture:
    """Activations of one prompt set, fp32 on CPU; ``k`` = ``n_positions``, last position = index −1.

    Attributes:
        resid0: ``[n, d_model]`` residual entering block 0 at the last position (embeddings).
        z: ``[n, k, n_layers, n_heads, d_head]`` per-head attention output before W_O.
        z_grad: same shape, d(logit diff)/dz, or None when captured without gradients.
        mlp_out: ``[n, n_layers, d_model]`` MLP outputs at the last position, as added to the residual
            (after a post-feedforward norm where the block has one).
        scale: ``[n]`` final norm's scale (RMS, or std for LayerNorm) at the last position.
        logit_diff: ``[n]`` refusal − compliance logit difference at the last position, in logits (before
            final soft-capping).
        resid_final: ``[n, d_model]`` residual entering the final norm at the last position.
        attn_post_scale: ``[n, n_layers]`` scale of each block's post-attention norm at the last position, or
            None when the blocks have none.
    """

    resid0: Float[Tensor, "n d_model"]
    z: Float[Tensor, "n k n_layers n_heads d_head"]
    z_grad: Float[Tensor, "n k n_layers n_heads d_head"] | None
    mlp_out: Float[Tensor, "n n_layers d_model"]
    scale: Float[Tensor, " n"]
    logit_diff: Float[Tensor, " n"]
    resid_final: Float[Tensor, "n d_model"]
    attn_post_scale: Float[Tensor, "n n_layers"] | None = None


@in_analysis_state
def capture(
    model: TransformerBridge,
    prompts: Sequence[str],
    sets: TokenSets,
    n_positions: int,
    *,
    grad: bool = True,
    batch_size: int = 8,
) -> Capture:
    """Run ``prompts`` through ``model`` once (plus one backward pass when ``grad``) and keep what tracing needs.

    Args:
        model: the bridge (raw or processed weights; nothing is edited).
        prompts: user requests; each is wrapped in the chat template with the generation prompt.
        sets: refusal and compliance tokens of the logit difference.
        n_positions: how many last positions of ``hook_z`` to keep (for patching).
        grad: also keep d(logit diff)/dz for attribution patching.
        batch_size: prompts per pass.

    Returns:
        A :class:`Capture` with one row per prompt, in input order. Runs in eval mode; the caller's mode is
        restored (:func:`sa_lens.model_state.analysis_state`).

    Raises:
        ValueError: no prompts, a prompt shorter than ``n_positions`` tokens, or hooks left on the model.
    """
    if len(prompts) == 0:
        raise InputError("capture() got no prompts.")
    n_layers = model.cfg.n_layers
    post_norm = has_post_attention_norm(model)
    parts: list[dict[str, Tensor]] = []
    for start in range(0, len(prompts), batch_size):
        enc = encode(model, prompts[start : start + batch_size])
        if int(enc["attention_mask"].sum(1).min()) < n_positions:
            raise InputError(f"A prompt has fewer than n_positions={n_positions} tokens; lower n_positions.")
        store: dict[str, Tensor] = {}

        def keep(x: Tensor, hook, key: str, store: dict[str, Tensor] = store) -> Tensor:
            store[key] = x  # the tensor itself, so autograd can differentiate with respect to it
            return x

        hooks = [("blocks.0.hook_resid_pre", lambda x, hook: keep(x, hook, "resid0")),
                 ("ln_final.hook_scale", lambda x, hook: keep(x, hook, "scale")),
                 ("ln_final.hook_in", lambda x, hook: keep(x, hook, "resid_final")),
                 (LOGITS_HOOK, lambda x, hook: keep(x, hook, "logits"))]
        for layer in range(n_layers):
            hooks.append((f"blocks.{layer}.attn.hook_z", lambda x, hook, l=layer: keep(x, hook, f"z{l}")))
            hooks.append((f"blocks.{layer}.hook_mlp_out", lambda x, hook, l=layer: keep(x, hook, f"mlp{l}")))
            if post_norm:
                hooks.append((f"blocks.{layer}.ln1_post.hook_scale", lambda x, hook, l=layer: keep(x, hook, f"post{l}")))
        with torch.set_grad_enabled(grad), model.hooks(fwd_hooks=hooks):
            model(enc["input_ids"], attention_mask=enc["attention_mask"])
            ld = logit_diff(store["logits"][:, -1], sets)
            z_grads = None
            if grad:
                zs = [store[f"z{layer}"] for layer in range(n_layers)]
                z_grads = torch.autograd.grad(ld.sum(), zs)
        with torch.no_grad():
            part = {
                "resid0": store["resid0"][:, -1],
                "z": torch.stack([store[f"z{layer}"][:, -n_positions:] for layer in range(n_layers)], 2),
                "mlp_out": torch.stack([store[f"mlp{layer}"][:, -1] for layer in range(n_layers)], 1),
                "scale": store["scale"][:, -1, 0],
                "logit_diff": ld,
                "resid_final": store["resid_final"][:, -1],
            }
            if post_norm:
                part["attn_post_scale"] = torch.stack([store[f"post{layer}"][:, -1, 0] for layer in range(n_layers)], 1)
            if z_grads is not None:
                part["z_grad"] = torch.stack([g[:, -n_positions:] for g in z_grads], 2)
            parts.append({k: v.detach().float().cpu() for k, v in part.items()})
    joined = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return Capture(
        resid0=joined["resid0"], z=joined["z"], z_grad=joined.get("z_grad"), mlp_out=joined["mlp_out"],
        scale=joined["scale"], logit_diff=joined["logit_diff"], resid_final=joined["resid_final"],
        attn_post_scale=joined.get("attn_post_scale"),
    )
