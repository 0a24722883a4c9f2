"""Which attention heads carry the harm direction, in activation space (design.md §1, anchors.md §4.4).

Per layer × head, on paired harmful and harmless requests, at the chat template's last position:

- ``projection_*``: the head's write into the residual stream (``hook_z`` through its slice of W_O, and
  through the block's post-attention norm where it has one: :func:`head_writes`) projected on the unit
  safety/harm direction of its layer, in residual-stream units;
- ``dla_*``: direct logit attribution to the refusal − compliance logit difference, every component of
  the final residual (embeddings, each head, attention biases, each MLP, unembedding bias) scaled by the
  cached final-norm scale and weight, as TransformerLens's ``apply_ln_to_stack`` does, so the
  components sum to the model's logit difference;
- ``attrib_patch_*``: attribution patching (gradient estimate) of each head's output from the other run;
- ``patch_*``: exact activation patching of the same, for the heads chosen by ``patch``.

``into_harmless`` = harmful activations patched into the harmless run (does the head make the model
refuse?); ``into_harmful`` = the reverse (is the head needed for refusal?).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sa_lens.analysis.capture import Capture, capture, post_instruction_length
from sa_lens.analysis.logit_diff import (
    COMPLIANCE_WORDS,
    REFUSAL_WORDS,
    TokenSets,
    token_sets,
    unembed_direction,
)
from sa_lens.analysis.patching import attribution_patch, patch_heads
from sa_lens.errors import InputError
from sa_lens.model_state import in_analysis_state
from sa_lens.safety_vector import SafetyVector

__all__ = ["COLUMNS", "dla_components", "head_outputs", "head_writes", "top_heads", "trace_heads"]

COLUMNS = ["layer", "head", "component", "measure", "value", "unit", "n"]


def head_outputs(model: TransformerBridge, z: Float[Tensor, "n n_layers n_heads d_head"]) -> Float[Tensor, "n n_layers n_heads d_model"]:
    """Each head's write into the residual stream, z_h · W_O[h] (no bias), fp32."""
    W_O = torch.stack([model.blocks[layer].attn.W_O.detach().float().cpu() for layer in range(model.cfg.n_layers)])
    return torch.einsum("nlhd,lhdm->nlhm", z, W_O)


def _norm_affine(ln) -> tuple[Tensor, Tensor | None, bool]:
    """(weight, bias, centres) of a bridge norm: its affine part and whether it subtracts the mean (LayerNorm)."""
    weight = ln.weight.detach().float().cpu()
    if ln.uses_weight_offset:
        weight = 1.0 + weight  # Gemma's RMSNorm multiplies by (1 + w)
    centres = not ln.uses_rms_norm
    bias = getattr(ln.original_component, "bias", None) if centres else None
    return weight, (None if bias is None else bias.detach().float().cpu()), centres


def _through_norm(
    x: Float[Tensor, "... n d_model"], scale: Float[Tensor, " n"], weight: Tensor, centres: bool
) -> Float[Tensor, "... n d_model"]:
    """A component through a norm with the scale cached on the whole input: ((x − mean x) if LayerNorm) / s · w."""
    if centres:
        x = x - x.mean(-1, keepdim=True)
    return x / scale[:, None] * weight


def head_writes(model: TransformerBridge, cap: Capture) -> Float[Tensor, "n n_layers n_heads d_model"]:
    """What each head adds to the residual stream at the last position, fp32, in residual units.

    z_h · W_O[h] (:func:`head_outputs`), and where the block normalises its attention output before adding it
    (Gemma-2's ``ln1_post``) that through the norm with the scale cached on the whole attention output, which is
    linear: the heads' writes then add up to what the block adds, bias and norm bias aside.
    """
    writes = head_outputs(model, cap.z[:, -1])
    if cap.attn_post_scale is None:
        return writes
    for layer in range(model.cfg.n_layers):
        weight, _, centres = _norm_affine(model.blocks[layer].ln1_post)
        normed = _through_norm(writes[:, layer].transpose(0, 1), cap.attn_post_scale[:, layer], weight, centres)
        writes[:, layer] = normed.transpose(0, 1)
    return writes


def _closure_tolerance(model: TransformerBridge) -> float:
    """Relative tolerance of Σ components = final residual: 1e-4 in fp32; 16 ulp of 1 in a half dtype (0.125 in
    bf16), still far below the O(1) gap of a component left out."""
    return max(1e-4, 16 * torch.finfo(model.cfg.dtype).eps)


def dla_components(model: TransformerBridge, cap: Capture, sets: TokenSets) -> tuple[list[dict], Float[Tensor, "n_components n"]]:
    """Direct logit attribution of every component of the final residual at the last position.

    The final residual is the sum of what each part of the model adds to it: the embeddings (position and
    scaling included), each head's z_h · W_O[h], the attention output bias, each MLP's output. Where a block
    normalises its attention output before adding it (Gemma-2's post-attention RMSNorm), each head's write
    and the bias go through that norm with its cached scale (linear given the scale) and the norm's bias is a
    component of its own; the MLP output is read after its post-feedforward norm (``hook_mlp_out`` is what
    the block adds). Each component c then goes through the final norm with its cached scale s:
    ((c − mean c) if LayerNorm) / s · w, and is dotted with W_U[refusal].mean − W_U[compliance].mean. The final
    norm bias and the unembedding bias are components of their own. Source: TransformerLens's
    ``ActivationCache.decompose_resid`` / ``apply_ln_to_stack`` / ``logit_attrs``, with norm weights applied
    explicitly because a bridge keeps them unfolded.

    The logit difference explained is the one before final logit soft-capping (Gemma-2's ``30·tanh(x/30)``
    is not linear, so no attribution of the capped logits sums exactly); :func:`capture` reads it there.

    Args:
        model: the bridge the capture came from.
        cap: a :class:`~sa_lens.analysis.capture.Capture` of that model.
        sets: the token sets of ``cap.logit_diff``.

    Returns:
        ``(labels, dla)``: one dict per component (``component``, ``layer``, ``head``) and ``[n_components, n]``
        values in logits, which sum over components to ``cap.logit_diff``: within 1e-4 logits on fp32 models
        (tests: Llama, Qwen2, GPT-2, Phi-3, Gemma-2). A bf16/fp16 model runs its forward pass in its own dtype
        (an fp32 copy would double its memory), so the sum closes to that dtype's rounding only: within 1 % of
        the largest |logit difference| (measured on the tiny models: ≤ 0.3 % in bf16, ≤ 0.3 % in fp16);
        :func:`trace_heads` reports the gap it measured as ``dla_closure_error``.

    Raises:
        ValueError: the components do not add up to the final residual (relative gap above 1e-4 in fp32): the
            architecture adds something to the residual that is not split here; the message names it.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = head_writes(model, cap)  # [n, L, H, d]
    labels: list[dict] = [{"component": "embed", "layer": pd.NA, "head": pd.NA}]
    stack = [cap.resid0]
    for layer in range(n_layers):
        labels += [{"component": f"L{layer}H{head}", "layer": layer, "head": head} for head in range(n_heads)]
        stack += [heads[:, layer, head] for head in range(n_heads)]
        post = None if cap.attn_post_scale is None else _norm_affine(model.blocks[layer].ln1_post)
        b_O = model.blocks[layer].attn.b_O
        if b_O is not None:
            labels.append({"component": f"attn_bias{layer}", "layer": layer, "head": pd.NA})
            b_O = b_O.detach().float().cpu().expand_as(cap.resid0)
            stack.append(b_O if post is None else _through_norm(b_O, cap.attn_post_scale[:, layer], post[0], post[2]))
        if post is not None and post[1] is not None:
            labels.append({"component": f"ln1_post_bias{layer}", "layer": layer, "head": pd.NA})
            stack.append(post[1].expand_as(cap.resid0))
        labels.append({"component": f"mlp{layer}", "layer": layer, "head": pd.NA})
        stack.append(cap.mlp_out[:, layer])
    resid = torch.stack(stack)  # [C, n, d]
    _check_closure(model, resid.sum(0), cap.resid_final)
    weight, bias, centres = _norm_affine(model.ln_final)
    direction = unembed_direction(model.W_U.detach().cpu(), sets)
    dla = _through_norm(resid, cap.scale, weight, centres) @ direction
    extras = []
    if bias is not None:
        labels.append({"component": "ln_final_bias", "layer": pd.NA, "head": pd.NA})
        extras.append((bias @ direction).expand(cap.scale.shape))
    b_U = model.b_U
    if b_U is not None:
        b_U = b_U.detach().float().cpu()
        labels.append({"component": "unembed_bias", "layer": pd.NA, "head": pd.NA})
        extras.append((b_U[list(sets.refusal)].mean() - b_U[list(sets.compliance)].mean()).expand(cap.scale.shape))
    if extras:
        dla = torch.cat([dla, torch.stack(extras)])
    return labels, dla


def _check_closure(model: TransformerBridge, total: Float[Tensor, "n d_model"], resid_final: Float[Tensor, "n d_model"]) -> None:
    """Refuse a decomposition whose components do not add up to the residual the final norm reads."""
    gap = float((total - resid_final).abs().max() / resid_final.abs().max().clamp_min(1e-12))
    if gap > _closure_tolerance(model):
        arch = type(model.original_model).__name__
        raise InputError(
            f"Direct logit attribution cannot decompose {arch}: embeddings + per-head outputs (z·W_O) + attention "
            f"biases + MLP outputs miss the residual entering the final norm by {gap:.1e} (relative), so this "
            "architecture adds to the residual stream something sa_lens does not split into components (e.g. a "
            "norm on the attention output other than Gemma-2's ln1_post). Use the patching measures "
            "(trace_heads(..., patch=...)), which need no decomposition, or run on a supported family "
            "(Llama, Qwen2, Mistral, GPT-2, Phi-3, Gemma-2)."
        )


def _directions(model: TransformerBridge, direction: SafetyVector | Tensor) -> Float[Tensor, "n_layers d_model"]:
    """Unit direction per layer; a single ``[d_model]`` vector is used at every layer."""
    d = direction.directions if isinstance(direction, SafetyVector) else torch.as_tensor(direction)
    d = d.detach().float().cpu()
    if d.ndim == 1:
        d = d.expand(model.cfg.n_layers, -1)
    if tuple(d.shape) != (model.cfg.n_layers, model.cfg.d_model):
        raise InputError(
            f"direction must be [d_model] or [n_layers, d_model] = [{model.cfg.n_layers}, {model.cfg.d_model}]; "
            f"got {tuple(d.shape)}."
        )
    norms = d.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        raise InputError("direction has an all-zero layer; pass layers= to trace only the layers it covers.")
    return d / norms


def _rows(measure: str, values: Float[Tensor, "n_layers n_heads"], unit: str, n: int) -> list[dict]:
    return [{"layer": layer, "head": head, "component": f"L{layer}H{head}", "measure": measure,
             "value": float(values[layer, head]), "unit": unit, "n": n}
            for layer in range(values.shape[0]) for head in range(values.shape[1])]


@in_analysis_state
def trace_heads(
    model: TransformerBridge,
    direction: SafetyVector | Tensor,
    harmful_prompts: Sequence[str],
    harmless_prompts: Sequence[str],
    *,
    refusal_tokens: Sequence[str | int] = REFUSAL_WORDS,
    compliance_tokens: Sequence[str | int] = COMPLIANCE_WORDS,
    n_positions: int | None = None,
    patch: int | str | Sequence[tuple[int, int]] | None = 20,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Trace the harm direction through every attention head (projection, DLA, attribution and activation patching).

    Args:
        model: a TransformerBridge (e.g. :func:`sa_lens.load_model`).
        direction: the safety/harm direction: a :class:`SafetyVector` (``[n_layers, d_model]``, harmful − harmless,
            read at ``resid_post``; head outputs of layer l are projected on row l) or one ``[d_model]`` vector.
        harmful_prompts, harmless_prompts: user requests, paired by index; the first
            ``min(len(harmful), len(harmless))`` of each are used.
        refusal_tokens, compliance_tokens: words (reply-initial, no leading space) or token ids of the logit
            difference; see :mod:`sa_lens.analysis.logit_diff` for the defaults.
        n_positions: last positions patched; default: the chat template's post-instruction tokens.
        patch: heads patched exactly (one forward pass per head and direction): the top-N heads by
            |attribution patching into harmless| (an int), ``"all"``, an explicit list of ``(layer, head)``,
            or None for attribution patching only.
        batch_size: prompts per pass.

    Returns:
        A tidy DataFrame with columns ``layer, head, component, measure, value, unit, n``; measures
        ``projection_{harmful,harmless,diff}`` (residual units), ``dla_{harmful,harmless,diff}`` (logits; also for
        ``embed``, ``mlp{l}``, bias components), ``attrib_patch_into_{harmless,harmful}`` and
        ``patch_into_{harmless,harmful}`` (change of the logit difference, logits). ``df.attrs`` holds the mean
        logit differences (before final soft-capping), the token sets, ``n_positions`` and
        ``dla_closure_error``: max |Σ DLA − logit difference| over prompts, in logits (≤ 1e-4 on fp32 models,
        ≤ 1 % of the logit difference on bf16/fp16 ones).
        The model runs in eval mode and is handed back in the caller's mode (:mod:`sa_lens.model_state`).

    Raises:
        ValueError: empty prompt lists, a direction of the wrong shape, token sets that overlap, hooks left on
            the model, or an architecture whose residual does not decompose (:func:`dla_components`).
    """
    n = min(len(harmful_prompts), len(harmless_prompts))
    if n == 0:
        raise InputError("trace_heads needs at least one harmful and one harmless prompt.")
    harmful, harmless = list(harmful_prompts[:n]), list(harmless_prompts[:n])
    units = _directions(model, direction)
    sets = token_sets(model.tokenizer, refusal_tokens, compliance_tokens)
    k = n_positions or post_instruction_length(model.tokenizer)
    caps = {name: capture(model, prompts, sets, k, batch_size=batch_size) for name, prompts in
            (("harmful", harmful), ("harmless", harmless))}

    rows: list[dict] = []
    projections = {}
    for name, cap in caps.items():
        projections[name] = torch.einsum("nlhd,ld->lh", head_writes(model, cap), units) / n
        rows += _rows(f"projection_{name}", projections[name], "residual units", n)
    rows += _rows("projection_diff", projections["harmful"] - projections["harmless"], "residual units", n)

    dla, closure = {}, 0.0
    for name, cap in caps.items():
        labels, values = dla_components(model, cap, sets)
        dla[name] = values.mean(1)
        closure = max(closure, float((values.sum(0) - cap.logit_diff).abs().max()))
    for measure, values in (("dla_harmful", dla["harmful"]), ("dla_harmless", dla["harmless"]),
                            ("dla_diff", dla["harmful"] - dla["harmless"])):
        rows += [{**label, "measure": measure, "value": float(v), "unit": "logits", "n": n} for label, v in zip(labels, values)]

    h, s = caps["harmful"], caps["harmless"]
    attrib_into_harmless = attribution_patch(h.z, s.z, s.z_grad)
    rows += _rows("attrib_patch_into_harmless", attrib_into_harmless, "logits", n)
    rows += _rows("attrib_patch_into_harmful", attribution_patch(s.z, h.z, h.z_grad), "logits", n)

    if patch is not None:
        if patch == "all":
            chosen = [(l, hd) for l in range(model.cfg.n_layers) for hd in range(model.cfg.n_heads)]
        elif isinstance(patch, int):
            order = attrib_into_harmless.flatten().abs().argsort(descending=True)[:patch]
            chosen = [(int(i) // model.cfg.n_heads, int(i) % model.cfg.n_heads) for i in order]
        else:
            chosen = [(int(l), int(hd)) for l, hd in patch]
        for measure, receivers, source, receiver in (("patch_into_harmless", harmless, h, s), ("patch_into_harmful", harmful, s, h)):
            effect = patch_heads(model, receivers, source.z, chosen, sets, receiver.logit_diff, batch_size)
            rows += [{"layer": l, "head": hd, "component": f"L{l}H{hd}", "measure": measure, "value": v,
                      "unit": "logits", "n": n} for (l, hd), v in effect.items()]

    df = pd.DataFrame(rows, columns=COLUMNS)
    df["layer"] = df["layer"].astype("Int64")
    df["head"] = df["head"].astype("Int64")
    df.attrs.update({
        "logit_diff_harmful": float(h.logit_diff.mean()),
        "logit_diff_harmless": float(s.logit_diff.mean()),
        "refusal_tokens": list(sets.refusal_words),
        "compliance_tokens": list(sets.compliance_words),
        "n_positions": k,
        "n_pairs": n,
        "dla_closure_error": closure,
    })
    return df


def top_heads(df: pd.DataFrame, measure: str, k: int = 10, by_abs: bool = False) -> list[tuple[int, int]]:
    """The ``k`` heads with the largest value (or |value|) of ``measure`` in a :func:`trace_heads` frame.

    Raises:
        ValueError: no head rows for ``measure``.
    """
    rows = df[(df["measure"] == measure) & df["head"].notna()]
    if rows.empty:
        raise InputError(f"No head rows for measure {measure!r}; measures present: {sorted(df['measure'].unique())}.")
    key = rows["value"].abs() if by_abs else rows["value"]
    best = rows.loc[key.sort_values(ascending=False).index[:k]]
    return [(int(l), int(h)) for l, h in zip(best["layer"], best["head"])]
