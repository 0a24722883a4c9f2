"""The in-context safety vector (ICV) per layer, from (unsafe, safe) demonstration pairs (paper §3.2).

Extraction follows the official code (paper-notes.md §3.2): each demonstration text goes through the
model; the residual stream after every block (``blocks.{l}.hook_out``) is averaged over the last 4
token positions; per pair, diff = h(unsafe) − h(safe), flattened over layers; the vector is the first
principal component of the diffs (rank-1 PCA on centred data, ``svd_flip`` sign) plus their mean,
reshaped to ``[n_layers, d_model]``. It points from safe to unsafe; Safe-Align *subtracts* it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from sa_lens.prompts import tokenize_left_padded

__all__ = ["SafetyVector", "demonstration_text"]

READ_HOOK = "blocks.{layer}.hook_out"
LAST_N_POSITIONS = 4


def demonstration_text(question: str, answer: str) -> str:
    """One demonstration exactly as the official code writes it (paper-notes.md §3.2).

    The official template is ``"Question: {q}\\n    Answer: {a}\\n    "`` stripped of surrounding spaces
    and dots, so the indentation before "Answer" stays and the text ends in a newline — which is one of
    the last 4 tokens that extraction averages.
    """
    return f"Question: {question}\n    Answer: {answer}\n    ".strip(" .")


def _pc1_plus_mean(diffs: Float[Tensor, "n features"]) -> Float[Tensor, "features"]:
    """First principal direction of the centred diffs plus their mean (official ICV code, Liu et al. 2023).

    PC1 has unit norm over all ``n_layers·d_model`` features, so the mean difference dominates the sum
    (paper-notes.md §3.2): in effect a difference of means with a small PC1 term.
    """
    mean = diffs.mean(0)
    _, _, vh = torch.linalg.svd(diffs - mean, full_matrices=False)
    u_sign_ref = (diffs - mean) @ vh[0]
    # svd_flip (u-based, as sklearn and the official ICV code): the largest |u| entry is made positive.
    sign = torch.sign(u_sign_ref[u_sign_ref.abs().argmax()])
    return vh[0] * (sign if sign != 0 else 1.0) + mean


@dataclass
class SafetyVector:
    """ICV directions per layer, pointing from safe toward unsafe (the official sign).

    Attributes:
        directions: ``Float[Tensor, "n_layers d_model"]``, fp32: the mean unsafe − safe difference of
            residual-stream states (activation units) plus a unit-norm PC1 spread over all layers.
        meta: provenance — hook point read, positions, method, sign convention, model name, n_pairs.
    """

    directions: Float[Tensor, "n_layers d_model"]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.directions.ndim != 2:
            raise ValueError(f"directions must be [n_layers, d_model], got shape {tuple(self.directions.shape)}.")
        if not torch.isfinite(self.directions).all():
            raise ValueError("Safety vector holds NaN or inf; re-extract it (check the model's activations for overflow).")

    @property
    def n_layers(self) -> int:
        return self.directions.shape[0]

    @property
    def d_model(self) -> int:
        return self.directions.shape[1]

    @classmethod
    @torch.no_grad()
    def from_pairs(
        cls, model: TransformerBridge, pairs: Sequence[tuple[str, str]], batch_size: int = 16
    ) -> SafetyVector:
        """Extract the ICV from (unsafe_text, safe_text) demonstration pairs (official code, paper-notes.md §3.2).

        Texts are batched with left padding, attention masks and mask-derived position ids, so each
        row's last 4 positions are its own last 4 tokens and padding changes nothing.

        Args:
            model: the bridge to read (for Safety Arithmetic: the HDR-edited model, as in the paper).
            pairs: ``(unsafe, safe)`` demonstration texts, e.g. built with :func:`demonstration_text`.
            batch_size: texts per forward pass.

        Returns:
            A SafetyVector ``[n_layers, d_model]``.

        Raises:
            ValueError: no pairs, or a pair that is not two non-empty strings.
        """
        if len(pairs) == 0:
            raise ValueError("pairs is empty; pass at least one (unsafe_text, safe_text) demonstration pair.")
        for i, pair in enumerate(pairs):
            if len(pair) != 2 or not all(isinstance(t, str) and t.strip() for t in pair):
                raise ValueError(f"pairs[{i}] must be two non-empty strings (unsafe_text, safe_text).")
        texts = [t for pair in pairs for t in pair]
        states = _last_positions_mean(model, texts, batch_size)  # [2n, L, d]
        diffs = (states[0::2] - states[1::2]).flatten(1)
        directions = _pc1_plus_mean(diffs).view(states.shape[1], states.shape[2])
        meta = {
            "hook_point": READ_HOOK,
            "positions": f"last{LAST_N_POSITIONS}_mean",
            "method": "pca_plus_mean",
            "sign": "unsafe_minus_safe",
            "model": str(getattr(model.original_model.config, "_name_or_path", "")),
            "n_pairs": len(pairs),
        }
        return cls(directions.contiguous(), meta)


def _last_positions_mean(
    model: TransformerBridge, texts: Sequence[str], batch_size: int
) -> Float[Tensor, "n_texts n_layers d_model"]:
    n_layers = model.cfg.n_layers
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenize_left_padded(
            model.tokenizer, texts[start : start + batch_size], add_special_tokens=True, device=model.cfg.device
        )
        captured: dict[int, Tensor] = {}

        # Left padding puts each row's last tokens in the last columns; a text shorter than the window
        # would average pads in, so the mean is over the real tokens of the window only.
        window = enc["attention_mask"][:, -LAST_N_POSITIONS:, None].float()

        def grab(x: Tensor, hook, layer: int) -> Tensor:
            captured[layer] = (x[:, -LAST_N_POSITIONS:, :].float() * window).sum(1) / window.sum(1)
            return x

        hooks = [
            (READ_HOOK.format(layer=layer), lambda x, hook, layer=layer: grab(x, hook, layer))
            for layer in range(n_layers)
        ]
        position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with model.hooks(fwd_hooks=hooks):
            model.original_model(**enc, position_ids=position_ids, use_cache=False)
        out.append(torch.stack([captured[layer] for layer in range(n_layers)], dim=1))
    return torch.cat(out).cpu()
