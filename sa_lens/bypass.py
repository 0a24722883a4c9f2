"""Run a bridge's Hugging Face model with the bridge components no hook needs swapped for the modules they wrap.

Why. A ``TransformerBridge`` puts one component around every Hugging Face module so that its hook points fire,
and those components cost time even when nothing is hooked: each RMSNorm is computed twice (once for
``hook_scale``/``hook_normalized``, once by the wrapped module), attention is reimplemented step by step in eager
mode (for ``hook_attn_scores``/``hook_pattern``) with the key/value copies grouped-query attention needs, and every
hook point is a Python call. Generating 24 tokens for 32 chat prompts on SmolLM2-135M (fp32, CPU), the bridge's
model spent 5.0 s of CPU where plain ``transformers`` spent 4.0 s, most of it in copies, the second norm and the
eager attention. A Safe-Align state hooks one point per layer (``blocks.L.mlp.hook_out``); nothing needs the rest.

What it does. :func:`bypass_unhooked` walks the Hugging Face module tree and, for the duration of a call, puts each
bridge component's ``original_component`` in its place when no hook point inside the component has a hook and no
other hook sits on it. A component that is needed stays, and the walk goes on inside what it wraps, so a block goes
while its hooked MLP stays, and a hooked block keeps its hook points while its attention goes. Hooks on the wrapped
Hugging Face modules stay where they are. Parameters are shared, so HDR's in-place edits are seen either way. On
exit, also after an exception, every component is back where it was.

Attention. When every attention component is bypassed, attention runs as Hugging Face runs it by default, with
PyTorch's ``scaled_dot_product_attention`` (``sdpa``), unless the checkpoint's attention has logit soft-capping or
attention sinks, which ``sdpa`` does not compute: then eager. While any attention component is hooked the bridge's
eager attention stays, for all layers. With eager attention the bypassed model's logits equal the bridge's (bit for
bit on Llama-style models, to float rounding on GPT-2); ``sdpa`` differs from eager by float rounding (≤ 1.3e-4 in
fp32 logits on the default model), so a greedy reply equals what ``transformers``' own ``generate`` gives on the
same checkpoint, the reference of lm-eval, HarmBench and vLLM parity checks.

When it does nothing. A bridge in TransformerLens's compatibility mode or with processed weights (folded layer
norms, centred writing weights: ``process_weights``) or with ``use_split_qkv_input``, ``use_attn_in``,
``use_attn_result`` or ``use_hook_mlp_in`` on computes what its hook points describe, not what the wrapped modules
compute; it runs as is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["bypass_unhooked", "hooked"]

_DECOMPOSED_FLAGS = ("use_split_qkv_input", "use_attn_in", "use_attn_result", "use_hook_mlp_in")


def hooked(module: torch.nn.Module) -> bool:
    """Whether a hook a caller put there sits on ``module`` itself (not on its submodules).

    On a TransformerLens hook point, any hook: its own handles (``fwd_hooks`` / ``bwd_hooks``) or any PyTorch hook.
    Elsewhere, a PyTorch hook that is not machinery (sa_lens's KV-cache routing, TransformerLens's residual
    captures, which feed only the flags that switch the bypass off: :func:`sa_lens.model_state.is_machinery_hook`).
    """
    from sa_lens.model_state import TORCH_HOOK_DICTS, is_machinery_hook  # it imports generation, which imports us

    hooks = [fn for table in TORCH_HOOK_DICTS for fn in getattr(module, table).values()]
    if hasattr(module, "fwd_hooks"):  # a hook point: its handles wrap the caller's function in library code
        return bool(module.fwd_hooks or module.bwd_hooks or hooks)
    # An unknown hook keeps what it sits on: the cost of a wrong guess is speed, never a wrong value.
    return not all(is_machinery_hook(fn) for fn in hooks)


def _needed(component: torch.nn.Module, wrapped: torch.nn.Module, hook_point: type, bridge_component: type) -> bool:
    """Whether a hook depends on this component's own forward: :func:`hooked` on one of its hook points or on it.
    What stays reachable through the wrapped module does not count: the walk decides for it there (a block whose
    MLP is hooked can go, its MLP stays), and hooks on Hugging Face modules fire either way. A sub-component the
    wrapped module does not reach (GPT-2's q/k/v split out of one fused projection) counts as the component's
    own."""
    reachable = {id(m) for m in wrapped.modules()}
    return any(isinstance(module, (hook_point, bridge_component)) and hooked(module)
               for module in component.modules() if id(module) not in reachable)


def _runs_as_wrapped(bridge: TransformerBridge, bridge_component: type) -> bool:
    if getattr(bridge, "compatibility_mode", False) or getattr(bridge, "_weights_processed", False):
        return False
    if any(bool(getattr(bridge.cfg, flag, False)) for flag in _DECOMPOSED_FLAGS):
        return False
    return not any(
        getattr(m, "compatibility_mode", False) or getattr(m, "_use_processed_weights", False)
        for m in bridge.original_model.modules() if isinstance(m, bridge_component)
    )


@contextlib.contextmanager
def bypass_unhooked(bridge: TransformerBridge) -> Iterator[int]:
    """Within the block, ``bridge.original_model`` runs with every bridge component no hook needs replaced by the
    Hugging Face module it wraps (see the module docstring for what counts and why).

    For forward passes and ``generate`` on ``bridge.original_model`` only (hooks registered inside the block on
    bypassed points would not fire). Values equal the bridge's to float rounding (bit for bit with eager attention
    on Llama-style models); hooks fire on the same tensors, as many times.

    Yields:
        How many components were bypassed (0 when the bridge must run as is).

    Raises:
        Nothing of its own; an exception inside the block propagates after the tree and the attention
        implementation are restored.
    """
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    hf = bridge.original_model
    if not _runs_as_wrapped(bridge, GeneralizedComponent):
        yield 0
        return
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    attention: list[tuple[torch.nn.Module, bool]] = []  # (wrapped HF attention, bypassed)

    def visit(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            wrapped = getattr(child, "original_component", None) if isinstance(child, GeneralizedComponent) else None
            if wrapped is None:
                visit(child)
                continue
            bypass = not _needed(child, wrapped, HookPoint, GeneralizedComponent)
            if isinstance(child, AttentionBridge):
                attention.append((wrapped, bypass))
            if bypass:
                swapped.append((parent, name, child))
                setattr(parent, name, wrapped)
            visit(wrapped)

    configs: list[tuple[Any, str]] = []
    try:
        visit(hf)
        if attention and all(bypassed for _, bypassed in attention) and _sdpa_computes(hf, [a for a, _ in attention]):
            for config in {id(c): c for c in [hf.config, *(getattr(a, "config", None) for a, _ in attention)]
                           if c is not None}.values():
                configs.append((config, config._attn_implementation))
                config._attn_implementation = "sdpa"
        yield len(swapped)
    finally:
        for config, implementation in reversed(configs):
            config._attn_implementation = implementation
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def _sdpa_computes(hf: torch.nn.Module, attention: list[torch.nn.Module]) -> bool:
    """Whether PyTorch's sdpa computes what these attention modules compute: the model class supports it and no
    module soft-caps its logits (Gemma-2) or adds attention sinks (gpt-oss), which sdpa leaves out."""
    if not getattr(type(hf), "_supports_sdpa", False):
        return False
    return not any(getattr(a, "attn_logit_softcapping", None) is not None or getattr(a, "sinks", None) is not None
                   for a in attention)
