"""Safe-Align inside vLLM's workers: a worker extension that installs and removes per-layer steering hooks.

vLLM builds this class into each worker (``LLM(..., worker_extension_cls="sa_lens.vllm_worker.SteeringExtension")``)
and :class:`sa_lens.vllm_backend.VLLMBackend` calls its methods on every worker through ``LLM.collective_rpc``, so
tensor-parallel workers all steer their own replica. The hooks are plain PyTorch forward hooks on each decoder
layer's ``mlp`` (TransformerLens's ``hook_mlp_out``) or ``self_attn`` (``hook_attn_out``) module, the modules the
bridge's hook points wrap, and apply the same step functions as the HF path (:data:`sa_lens.steering.FORMULAS`).
vLLM flattens a batch to ``[tokens, d_model]``; the steps act on the last axis, so they apply unchanged.

Hooks fire only when vLLM runs the module eagerly: CUDA-graph replays skip them. The extension counts the calls of
each hook so the backend can prove that every decode step was steered (see ``VLLMBackend``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sa_lens.steering import FORMULAS

__all__ = ["MODULE_OF_SITE", "SteeringExtension", "decoder_layers"]

MODULE_OF_SITE = {"mlp_out": "mlp", "attn_out": "self_attn"}
"""Safe-Align site → the attribute of a vLLM decoder layer whose output is that hook point."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a vLLM causal LM (``model.model.layers`` in Llama, Mistral, Qwen and Gemma).

    Raises:
        ValueError: an architecture without ``model.layers``; the message names the model class.
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"sa_lens cannot find the decoder layers of vLLM's {type(model).__name__} (no model.layers);"
                         " evaluate this model with backend='hf'.")
    return list(layers)


class SteeringExtension:
    """Mixed into vLLM's worker class; every method runs in each worker (``LLM.collective_rpc``)."""

    def _sa_lens_model(self) -> nn.Module:
        runner = self.model_runner  # type: ignore[attr-defined]  # set by vLLM's worker
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def sa_lens_install(self, specs: list[dict[str, Any]]) -> int:
        """Install one forward hook per spec, replacing any installed before.

        Args:
            specs: ``{"layer": int, "site": "mlp_out" | "attn_out", "formula": "official" | "add" | "ablate",
                "alpha": float, "vector": list[float]}`` (the layer's ICV ``[d_model]``, residual-stream units).

        Returns:
            The number of hooks installed in this worker (pipeline-parallel workers skip layers they lack).
        """
        self.sa_lens_remove()
        layers = decoder_layers(self._sa_lens_model())
        self._sa_lens_handles: list = []
        self._sa_lens_calls: dict[int, int] = {}
        for spec in specs:
            layer = layers[spec["layer"]]
            module = getattr(layer, MODULE_OF_SITE[spec["site"]], None)
            if module is None:  # a pipeline-parallel stage that does not hold this layer
                continue
            weight = next(module.parameters())
            v = torch.tensor(spec["vector"], dtype=torch.float32, device=weight.device)
            self._sa_lens_handles.append(module.register_forward_hook(
                self._sa_lens_hook(spec["layer"], FORMULAS[spec["formula"]], v, float(spec["alpha"]))))
        return len(self._sa_lens_handles)

    def _sa_lens_hook(self, layer: int, step, v: Tensor, alpha: float):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            self._sa_lens_calls[layer] = self._sa_lens_calls.get(layer, 0) + 1
            if isinstance(output, tuple):  # modules that return (hidden, extra): steer the hidden states only
                return (step(output[0], v, alpha), *output[1:])
            return step(output, v, alpha)

        return hook

    def sa_lens_remove(self) -> int:
        """Remove every hook this extension installed; returns how many were removed."""
        handles = getattr(self, "_sa_lens_handles", [])
        for h in handles:
            h.remove()
        self._sa_lens_handles = []
        return len(handles)

    def sa_lens_hook_calls(self, reset: bool = True) -> dict[int, int]:
        """Forward calls per steered layer since the last reset (one per engine step that ran the layer)."""
        calls = dict(getattr(self, "_sa_lens_calls", {}))
        if reset:
            self._sa_lens_calls = {}
        return calls
