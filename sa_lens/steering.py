"""Safe-Align injection: named TransformerLens hooks that steer each layer away from the ICV.

Default formula (official code, paper-notes.md §3.2 and §7.4), per token with m the MLP output and v the
layer's ICV (pointing from safe to unsafe)::

    c  = 0.1 · α · (1 + max(0, cos(m, v)))
    m' = ‖m‖ · normalize(m/‖m‖ − c · v/‖v‖)

The push grows when m already leans toward the unsafe direction (the cosine gate), and the output
keeps its norm. By default it applies at every position of every layer's MLP output, prompt and
generated tokens alike, as the official module wrapper does. Other sites, an additive formula,
directional ablation and prompt-only / generated-only policies are options (see :func:`safety_hooks`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from sa_lens.defaults import DEFAULT_ALPHA
from sa_lens.errors import InputError
from sa_lens.models import DeviceCopies, hook_point_device
from sa_lens.positions import generated_mask
from sa_lens.safety_vector import SafetyVector, processing_mode
from sa_lens.validation import is_finite_real

if TYPE_CHECKING:
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["DEFAULT_ALPHA", "FORMULAS", "OFFICIAL_FACTOR", "POSITIONS", "SITES", "ablate_direction", "add_step",
           "check_steering_options", "check_vector_fits", "inject_official", "safety_hooks"]

OFFICIAL_FACTOR = 0.1  # the code's extra factor, not in the paper (paper-notes.md §7.4)

HookFn = Callable[..., Tensor]


def inject_official(
    m: Float[Tensor, "batch pos d_model"], v: Float[Tensor, " d_model"], alpha: float
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


def add_step(x: Float[Tensor, "batch pos d_model"], v: Float[Tensor, " d_model"], alpha: float) -> Float[Tensor, "batch pos d_model"]:
    """Plain additive steering toward safe: x − α·v, with v in activation units (ActAdd / CAA style)."""
    return (x.float() - alpha * v.float().to(x.device)).to(x.dtype)


def ablate_direction(x: Float[Tensor, "batch pos d_model"], v: Float[Tensor, " d_model"], alpha: float) -> Float[Tensor, "batch pos d_model"]:
    """Directional ablation: x − (x·v̂)v̂, the component along v removed (Arditi et al. 2024); α is unused."""
    v_unit = torch.nn.functional.normalize(v.float().to(x.device), dim=-1)
    xf = x.float()
    return (xf - (xf @ v_unit)[..., None] * v_unit).to(x.dtype)


SITES = {
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_post": "blocks.{layer}.hook_resid_post",
}
FORMULAS: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "official": inject_official,
    "add": add_step,
    "ablate": ablate_direction,
}
POSITIONS = ("all", "prompt", "generated")


def check_steering_options(
    alpha: float, site: str, formula: str, positions: str, per_layer_alpha: Mapping[int, float] | None = None
) -> None:
    """Raise InputError unless α (and each per-layer α) is finite and site, formula and positions are known."""
    for a in [alpha, *(per_layer_alpha or {}).values()]:
        if not is_finite_real(a):
            raise InputError(f"alpha must be a finite number, got {a!r}.")
    for name, value, allowed in (("site", site, SITES), ("formula", formula, FORMULAS), ("positions", positions, POSITIONS)):
        if not isinstance(value, str) or value not in allowed:
            raise InputError(f"{name} must be one of {sorted(allowed)}; got {value!r}.")


def check_vector_fits(sv: SafetyVector, model: TransformerBridge) -> None:
    """Raise InputError unless ``sv`` has the model's ``[n_layers, d_model]`` and was read in its processing mode.

    A vector read with raw weights and applied after ``enable_compatibility_mode()`` (or the reverse) is in
    other coordinates than the activations it would steer; vectors saved before the mode was recorded
    count as raw, the only mode sa_lens read them in.
    """
    cfg = model.cfg
    if (sv.n_layers, sv.d_model) != (cfg.n_layers, cfg.d_model):
        raise InputError(
            f"Safety vector is [{sv.n_layers}, {sv.d_model}] but the model has {cfg.n_layers} layers of "
            f"width {cfg.d_model}; extract the vector from this model (SafetyVector.from_pairs)."
        )
    made, now = sv.meta.get("processing", "raw"), processing_mode(model)
    if made != now:
        raise InputError(
            f"The safety vector was read from a model with {made} weights but this model's are {now} "
            "(enable_compatibility_mode() folds and centres them); extract the vector in the mode you steer in."
        )


def safety_hooks(
    sv: SafetyVector,
    alpha: float = DEFAULT_ALPHA,
    layers: Sequence[int] | None = None,
    *,
    site: str = "mlp_out",
    formula: str = "official",
    positions: str = "all",
    per_layer_alpha: Mapping[int, float] | None = None,
    model: TransformerBridge | None = None,
) -> list[tuple[str, HookFn]]:
    """Named forward hooks that steer each chosen layer away from the ICV (Safe-Align, paper §3.2).

    Use with ``with model.hooks(fwd_hooks=safety_hooks(sv)):`` around a forward pass or
    :func:`sa_lens.generate`; the hooks are gone when the block exits, also on error.

    Args:
        sv: the safety vector ``[n_layers, d_model]`` (pointing from safe toward unsafe).
        alpha: α, 0.12 by default (paper A.6); for ``official`` the effective step is 0.1·α·(1 + relu(cos)),
            for ``add`` it is α in activation units.
        layers: layer indices to steer; all by default (BASE/SFT), layers l−1..l+1 for EDIT.
        site: ``mlp_out`` (official, paper A.2), ``attn_out``, ``resid_pre`` or ``resid_post``.
        formula: ``official`` (normalise, cosine gate, 0.1 factor, keep norm), ``add`` (x − α·v) or
            ``ablate`` (project the direction out).
        positions: ``all`` (official), ``prompt`` or ``generated`` — labelled identically with and without
            the KV cache during :func:`sa_lens.generate`; outside it every position counts as prompt.
        per_layer_alpha: ``{layer: α}`` overriding ``alpha`` for some layers.
        model: the bridge the hooks are for; when given, the vector's shape and the processing mode it was
            read under (raw weights, or folded / centred by ``enable_compatibility_mode()``) must match it, and
            each layer's vector is placed once, in fp32, on the device of its hook point (that layer's GPU when
            the model spans several: :func:`sa_lens.models.hook_point_device`). Without it, the first call places
            it on the activations' device. Either way later calls copy nothing.

    Returns:
        ``[(hook_name, fn), ...]`` with names like ``blocks.{l}.hook_mlp_out``; each ``fn.__name__`` is
        ``sa_lens.safe_align.{site}.L{l}`` so hook listings say what it is.

    Raises:
        ValueError: a non-finite α, a layer outside the vector, an unknown site, formula or policy, or
            (with ``model``) a vector of another shape or processing mode.
    """
    per_layer_alpha = dict(per_layer_alpha or {})
    check_steering_options(alpha, site, formula, positions, per_layer_alpha)
    if model is not None:
        check_vector_fits(sv, model)
    layers = list(range(sv.n_layers)) if layers is None else list(layers)
    bad = [layer for layer in [*layers, *per_layer_alpha] if not 0 <= layer < sv.n_layers]
    if bad:
        raise InputError(f"Layer indices {bad} are outside the safety vector's {sv.n_layers} layers.")
    step = FORMULAS[formula]
    hooks = []
    for layer in layers:
        hook_name = SITES[site].format(layer=layer)
        # The formulas compute in fp32: the vector is kept in fp32 on its layer's device, placed here once
        # (on that layer's GPU under n_devices / a device map), so a call copies nothing.
        where = None if model is None else hook_point_device(model, hook_name)
        placed = DeviceCopies(sv.directions[layer], torch.float32, where)

        def fn(x: Tensor, hook: HookPoint, v: DeviceCopies = placed, a: float = per_layer_alpha.get(layer, alpha)) -> Tensor:
            steered = step(x, v.on(x.device), a)
            if positions == "all":
                return steered
            keep = generated_mask(x.shape[1], x.device)
            keep = keep if positions == "generated" else ~keep
            return torch.where(keep[None, :, None], steered, x)

        fn.__name__ = fn.__qualname__ = f"sa_lens.safe_align.{site}.L{layer}"
        hooks.append((hook_name, fn))
    return hooks
