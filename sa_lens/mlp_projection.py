"""A decoder layer's MLP output projection, the matrix ROME edits, located on a bridge or a plain HF model.

ROME (Meng et al. 2022, §3) treats the MLP's output projection W as a linear key–value memory: its input (the MLP's
hidden activation, the *key* k) at a subject's last token selects a value W·k written into the residual stream.
This module finds W for a layer by its checkpoint name (:func:`sa_lens.parameter_names.is_mlp_output_projection`),
the module that owns it (``nn.Linear``, stored ``[out, in]``, or GPT-2's ``Conv1D``, stored ``[in, out]``), and
reads keys at chosen positions with a forward pre-hook that is removed on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor, nn

from sa_lens.bridge import is_bridge
from sa_lens.errors import InputError
from sa_lens.parameter_names import checkpoint_name, is_mlp_output_projection, layer_count, layer_index

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["MlpOutput", "capture_keys", "decoder_layer", "decoder_layer_count", "mlp_output"]


@dataclass(frozen=True)
class MlpOutput:
    """Layer ``layer``'s MLP output projection.

    Attributes:
        layer: decoder layer index.
        name: the weight's checkpoint name (``model.layers.5.mlp.down_proj.weight``).
        module: the module that owns the weight (its forward pre-hook sees the keys, its forward hook the values).
        weight: the live weight tensor.
        transposed: True for ``Conv1D`` (``[d_mlp, d_model]``); False for ``nn.Linear`` (``[d_model, d_mlp]``).
    """

    layer: int
    name: str
    module: nn.Module
    weight: Tensor
    transposed: bool

    @property
    def d_key(self) -> int:
        """The key width (the MLP's hidden size, ``d_mlp``)."""
        return self.weight.shape[0 if self.transposed else 1]

    def update(self, delta: Float[Tensor, "d_model d_mlp"]) -> Tensor:
        """``delta`` (in the ``[d_model, d_mlp]`` math layout) in the weight's own layout and dtype."""
        return (delta.T if self.transposed else delta).to(self.weight.dtype)


def _hf(model) -> PreTrainedModel:
    return model.original_model if is_bridge(model) else model


def decoder_layer_count(model) -> int:
    """The number of decoder layers of a bridge or HF model, from its parameter names."""
    return layer_count(n for n, _ in _hf(model).named_parameters())


def mlp_output(model, layer: int) -> MlpOutput:
    """Locate layer ``layer``'s MLP output projection on a TransformerBridge or a Hugging Face model.

    Raises:
        ValueError: ``layer`` is not an integer in range (names the range), the architecture has no single
            recognisable MLP output projection at that layer (e.g. a mixture of experts; names what was found), or
            a bridge whose weights ``enable_compatibility_mode()`` processed.
    """
    if is_bridge(model) and getattr(model, "_weights_processed", False):
        # A processed bridge runs on folded copies: the checkpoint's module is never called (its hooks never fire)
        # and an edit of its weight would not reach the bridge's forward pass.
        raise InputError(
            "This bridge's weights were folded/centred by enable_compatibility_mode(), so its forward pass no longer "
            "reads the checkpoint's MLP output projection and a ROME edit cannot reach it. Edit a bridge loaded with "
            "sa_lens.load_model() before (or without) enable_compatibility_mode()."
        )
    n_layers = decoder_layer_count(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise InputError(f"layer must be a decoder layer index in 0..{n_layers - 1}; got {layer!r}.")
    found = []
    for module_name, module in _hf(model).named_modules():
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        name = checkpoint_name(f"{module_name}.weight")
        if layer_index(name) == layer and is_mlp_output_projection(name):
            found.append((name, module, weight))
    if len(found) != 1:
        kind = type(_hf(model)).__name__
        raise InputError(
            f"Cannot locate the MLP output projection of layer {layer} in {kind}: "
            f"{'none of its weights is named like one' if not found else f'{len(found)} candidates {[f[0] for f in found]}'} "
            "(down_proj, mlp.c_proj, dense_4h_to_h, fc2, fc_out). ROME edits one dense MLP output matrix per layer; "
            "mixtures of experts and unknown layouts are not supported."
        )
    name, module, weight = found[0]
    if isinstance(module, nn.Linear):
        transposed = False
    elif type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight [in, out], y = x @ W + b
        transposed = True
    else:
        raise InputError(f"{name} belongs to a {type(module).__name__}, not an nn.Linear or Conv1D; ROME cannot "
                         "read its keys and values.")
    return MlpOutput(layer, name, module, weight, transposed)


def decoder_layer(model, layer: int) -> nn.Module:
    """The module of decoder layer ``layer`` (its output is the residual stream after the layer: MEMIT's z).

    On a bridge, the wrapped Hugging Face layer inside the bridge's block. Errors as :func:`mlp_output`.
    """
    name = mlp_output(model, layer).name
    prefix = name[: name.index(f".{layer}.")] + f".{layer}"  # model.layers.5.mlp.down_proj.weight → model.layers.5
    found = [m for n, m in _hf(model).named_modules() if checkpoint_name(n) == prefix]
    return found[-1]  # the innermost: a bridge lists its block first, then the HF layer it wraps


@contextlib.contextmanager
def capture_keys(
    site: MlpOutput, positions: Tensor, out: list[Tensor]
) -> Iterator[None]:
    """While active, each forward appends the keys at ``positions`` (``[batch]`` token indices) to ``out``.

    Appends ``Float[Tensor, "batch d_mlp"]`` in float32 per forward call; the hook is removed on exit.
    """

    def hook(_module: nn.Module, args: tuple) -> None:
        x = args[0]
        out.append(x[torch.arange(x.shape[0], device=x.device), positions.to(x.device)].detach().float())

    handle = site.module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
