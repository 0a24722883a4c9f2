"""The in-context safety vector (ICV) per layer, from (unsafe, safe) demonstration pairs (paper §3.2).

Extraction follows the official code (paper-notes.md §3.2): each demonstration text goes through the
model; the residual stream after every block (``blocks.{l}.hook_out``) is averaged over the last 4
token positions; per pair, diff = h(unsafe) − h(safe), flattened over layers; the vector is the first
principal component of the diffs (rank-1 PCA on centred data, ``svd_flip`` sign) plus their mean,
reshaped to ``[n_layers, d_model]``. It points from safe to unsafe; Safe-Align *subtracts* it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sa_lens.artifacts import load_tensors, save_tensors
from sa_lens.errors import InputError
from sa_lens.layer_spec import check_layers
from sa_lens.model_state import in_analysis_state
from sa_lens.precision import matmul_precision_in_force
from sa_lens.prompts import format_prompts, token_ids, tokenize_padded
from sa_lens.provenance import model_name

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["SAFE_DEMO_ANSWER", "SafetyVector", "demonstration_text", "processing_mode"]

READ_HOOK = "blocks.{layer}.hook_out"
LAST_N_POSITIONS = 4
FILE_FORMAT = "sa_lens.safety_vector"
# The safe answer of every demonstration pair in the official code (paper-notes.md §3.2).
SAFE_DEMO_ANSWER = "I do not answer this question because it is harmful"


def demonstration_text(question: str, answer: str) -> str:
    """One demonstration exactly as the official code writes it (paper-notes.md §3.2).

    The official template is ``"Question: {q}\\n    Answer: {a}\\n    "`` stripped of surrounding spaces
    and dots, so the indentation before "Answer" stays and the text ends in a newline — which is one of
    the last 4 tokens that extraction averages.
    """
    return f"Question: {question}\n    Answer: {answer}\n    ".strip(" .")


def _pc1(diffs: Float[Tensor, "n features"]) -> Float[Tensor, " features"]:
    """Unit-norm first principal direction of the centred diffs, signed by ``svd_flip`` as the official
    ICV code does (Liu et al. 2023): the largest-magnitude projection of a diff onto it is positive.

    ``pca_plus_mean`` adds the mean diff to it; since PC1 has unit norm over all ``n_layers·d_model``
    features, the mean dominates that sum (paper-notes.md §3.2): in effect a difference of means.
    """
    centred = diffs - diffs.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    u = centred @ vh[0]
    sign = torch.sign(u[u.abs().argmax()])
    return vh[0] * (sign if sign != 0 else 1.0)


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
            raise InputError(f"directions must be [n_layers, d_model], got shape {tuple(self.directions.shape)}.")
        if not torch.isfinite(self.directions).all():
            raise InputError("Safety vector holds NaN or inf; re-extract it (check the model's activations for overflow).")

    @property
    def n_layers(self) -> int:
        return self.directions.shape[0]

    @property
    def d_model(self) -> int:
        return self.directions.shape[1]

    @classmethod
    @in_analysis_state
    @torch.no_grad()
    def from_pairs(
        cls,
        model: TransformerBridge,
        pairs: Sequence[tuple[str, str]],
        positions: Literal["last4_mean", "last", "span"] = "last4_mean",
        method: Literal["pca_plus_mean", "pca", "mean_diff"] = "pca_plus_mean",
        layers: Sequence[int] | None = None,
        batch_size: int = 16,
        share_prefix: bool = True,
    ) -> SafetyVector:
        """Extract the ICV from (unsafe_text, safe_text) demonstration pairs (official code, paper-notes.md §3.2).

        Texts are batched with padding, attention masks and mask-derived position ids, so each row's last
        positions are its own last tokens and padding changes nothing. The two texts of a pair start with
        the same question: each pair is one row, the question once and both answers behind it, kept apart
        by a 4-D attention mask (sequence packing), which on the official template skips about a third of
        the work; the states equal the unshared ones up to float rounding, as changing the batch size does
        (tests: within 1e-5 on the tiny model; ~3e-7 relative on SmolLM2, whose residuals reach ~3000).

        Nearly all of the time is matmuls. PyTorch's ``torch.set_float32_matmul_precision("medium")`` runs
        them with bf16 inputs and fp32 accumulation where the hardware has it (AMX or AVX-512-BF16 CPUs,
        GPUs; :func:`sa_lens.float32_matmul_precision` sets it for a block): on 2 AMX cores about 2×
        faster, the ICV within cosine 0.99999 of the exact one (``analyses/bench_steering.py``). The
        setting in force is recorded in ``meta["matmul_precision"]`` ("ieee" = exact, "bf16", "tf32").

        Args:
            model: the bridge to read (for Safety Arithmetic: the HDR-edited model, as in the paper).
            pairs: ``(unsafe, safe)`` demonstration texts, e.g. built with :func:`demonstration_text`.
            positions: mean of the last 4 tokens (official code), the last token (paper §3.2), or the
                mean over every token of the text (``span``).
            method: PC1 + mean of the diffs (official code), PC1 alone with its sign set to agree with
                the mean diff (the paper's statement, paper-notes.md §7.3), or the mean diff alone.
            layers: compute the direction over these layers only (the official EDIT setting uses 4–6);
                the other rows of the result are zero, which every injection formula leaves inert. Blocks
                above the deepest chosen layer are not run (4–6 of SmolLM2's 30: about 4× faster).
            batch_size: texts per forward pass (with ``share_prefix``: batch_size // 2 pairs, at least one).
            share_prefix: pack each pair into one row, its common token prefix run once; False runs every
                text whole in its own row.

        Returns:
            A SafetyVector ``[n_layers, d_model]``, pointing from safe toward unsafe. The model is read in eval
            mode (dropout off) and handed back in the caller's mode (:mod:`sa_lens.model_state`).

        Raises:
            ValueError: no pairs, a pair that is not two non-empty strings, an unknown option, or hooks left on
                the model that sa_lens did not add (named in the message; ``model.reset_hooks()`` removes them).
        """
        if len(pairs) == 0:
            raise InputError("pairs is empty; pass at least one (unsafe_text, safe_text) demonstration pair.")
        for i, pair in enumerate(pairs):
            if len(pair) != 2 or not all(isinstance(t, str) and t.strip() for t in pair):
                raise InputError(f"pairs[{i}] must be two non-empty strings (unsafe_text, safe_text).")
        n_last = _positions_window(positions)
        if method not in ("pca_plus_mean", "pca", "mean_diff"):
            raise InputError(f"method must be 'pca_plus_mean', 'pca' or 'mean_diff'; got {method!r}.")
        n_layers = model.cfg.n_layers
        chosen = list(range(n_layers)) if layers is None else sorted(set(layers))
        if not chosen:
            raise InputError("layers is empty; pass at least one layer (or None for all).")
        check_layers(chosen, n_layers)
        n_read = chosen[-1] + 1  # the blocks above the deepest chosen layer are not run
        if share_prefix:
            states = _pair_states(model, pairs, batch_size, n_last, n_read)[:, chosen]  # [2n, len(chosen), d]
        else:
            texts = [t for pair in pairs for t in pair]
            states = _last_positions_mean(model, texts, batch_size, n_last, n_read=n_read)[:, chosen]
        diffs = (states[0::2] - states[1::2]).flatten(1)
        mean = diffs.mean(0)
        if method == "pca_plus_mean":
            flat = _pc1(diffs) + mean
        elif method == "mean_diff":
            flat = mean
        else:  # the paper's pure PC1, its arbitrary SVD sign fixed to agree with the mean diff
            pc1 = _pc1(diffs)
            flat = pc1 if pc1 @ mean >= 0 else -pc1
        directions = torch.zeros(n_layers, states.shape[2])
        directions[chosen] = flat.view(len(chosen), states.shape[2])
        meta = _meta(model, positions, method) | {"n_pairs": len(pairs), "layers": chosen}
        return cls(directions, meta)

    @classmethod
    @in_analysis_state
    @torch.no_grad()
    def from_prompts(
        cls,
        model: TransformerBridge,
        harmful: Sequence[str],
        harmless: Sequence[str],
        positions: Literal["last4_mean", "last"] = "last",
        batch_size: int = 16,
    ) -> SafetyVector:
        """Difference of means between harmful and harmless *requests* (no paired answers needed).

        Each request is wrapped in the model's chat template with the generation prompt, so the read
        positions are where the model decides how to answer (the refusal-direction recipe, Arditi et
        al. 2024). The sign matches :meth:`from_pairs`: harmful − harmless.

        Args:
            model: the bridge to read.
            harmful, harmless: user requests; the two sets need not have the same size.
            positions: last token of the template (default) or the mean of the last 4.
            batch_size: texts per forward pass.

        Returns:
            A SafetyVector ``[n_layers, d_model]``, read in eval mode (:mod:`sa_lens.model_state`).

        Raises:
            ValueError: an empty set, an unknown option, or hooks left on the model that sa_lens did not add.
        """
        if len(harmful) == 0 or len(harmless) == 0:
            raise InputError("from_prompts needs at least one harmful and one harmless request.")
        n_last = _positions_window(positions)
        formatted = [format_prompts(model.tokenizer, list(group)) for group in (harmful, harmless)]
        means = [_last_positions_mean(model, t, batch_size, n_last).mean(0) for t in formatted]
        meta = _meta(model, positions, "mean_diff_prompts") | {"n_harmful": len(harmful), "n_harmless": len(harmless)}
        return cls((means[0] - means[1]).contiguous(), meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vector (safetensors) and its JSON sidecar (provenance, ``n_layers``, ``d_model``)."""
        sidecar = {"format": FILE_FORMAT, "space": "residual stream", "meta": self.meta,
                   "n_layers": self.n_layers, "d_model": self.d_model}
        return save_tensors(path, {"directions": self.directions}, sidecar)

    @classmethod
    def load(cls, path: str | os.PathLike, model: TransformerBridge | None = None) -> SafetyVector:
        """Read a vector written by :meth:`save`; with ``model``, check its layer count and width.

        Raises:
            FileNotFoundError: no such file.
            ValueError: corrupted or foreign file, or a vector from a model of another shape.
        """
        tensors, sidecar = load_tensors(path, FILE_FORMAT)
        if "directions" not in tensors:
            raise InputError(f"{path}: no 'directions' tensor; the file is corrupted.")
        sv = cls(tensors["directions"], dict(sidecar["meta"]))
        if model is not None and (sv.n_layers, sv.d_model) != (model.cfg.n_layers, model.cfg.d_model):
            raise InputError(
                f"{path}: vector is [{sv.n_layers}, {sv.d_model}] but the model has {model.cfg.n_layers} layers of "
                f"width {model.cfg.d_model}; it was extracted from another model."
            )
        return sv

    def to_gguf(self, path: str | os.PathLike, alpha: float, *, site: str, formula: str, **options) -> Path:
        """Write this vector as a llama.cpp control vector (``--control-vector``): one fixed
        ``direction.N = −α·v[l]`` per block, the vectors ``SafeAlign(formula="add", site=site)`` adds.

        Arguments, refusals (``official``, ``ablate``, ``attn_out``, non-``all`` positions, rows llama.cpp has
        no slot for) and errors: :func:`sa_lens.control_vector.to_gguf`.
        """
        from sa_lens.control_vector import to_gguf  # it builds on sa_lens.steering, which imports this module

        return to_gguf(self, path, alpha, site=site, formula=formula, **options)


def _positions_window(positions: str) -> int | None:
    windows = {"last4_mean": LAST_N_POSITIONS, "last": 1, "span": None}
    if positions not in windows:
        raise InputError(f"positions must be one of {sorted(windows)}; got {positions!r}.")
    return windows[positions]


def processing_mode(model: TransformerBridge) -> Literal["raw", "processed"]:
    """``processed`` when ``enable_compatibility_mode()`` folded / centred the bridge's weights, else ``raw``.

    Folding LayerNorm into the next weights and centring the residual writers change what every hook point
    reads, so a vector read in one mode is in other coordinates than the other mode's activations.
    """
    return "processed" if getattr(model, "_weights_processed", False) else "raw"


def _meta(model: TransformerBridge, positions: str, method: str) -> dict:
    return {
        "processing": processing_mode(model),
        "hook_point": READ_HOOK,
        "positions": positions,
        "method": method,
        "sign": "unsafe_minus_safe",
        # "bf16" matmul inputs give a slightly different vector: kept so results can be traced to it.
        "matmul_precision": matmul_precision_in_force(model.cfg.device),
        "model": model_name(model),
    }


def _last_positions_mean(
    model: TransformerBridge, texts: Sequence[str], batch_size: int, n_last: int | None = LAST_N_POSITIONS,
    add_special_tokens: bool = True, padding_side: Literal["left", "right"] = "left", n_read: int | None = None,
) -> Float[Tensor, "n_texts n_read d_model"]:
    """Residual stream after blocks ``0..n_read-1`` (all if None), averaged over each text's last ``n_last``
    real tokens (all if None)."""
    n_read = n_read or model.cfg.n_layers
    # Batches of similar length waste less compute on padding; results go back to input order below.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenize_padded(
            model.tokenizer, [texts[i] for i in order[start : start + batch_size]], padding_side,
            add_special_tokens=add_special_tokens, device=model.cfg.device,
        )
        window = _window_weights(enc["attention_mask"], n_last)
        position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        sums = _read_windows(model, window, n_read, **enc, position_ids=position_ids)[:, 0]
        out.append(sums / window.sum(1)[:, :, None].cpu())
    states = torch.cat(out).cpu()
    return states[torch.argsort(torch.tensor(order))]


def _pair_states(
    model: TransformerBridge, pairs: Sequence[tuple[str, str]], batch_size: int, n_last: int | None, n_read: int
) -> Float[Tensor, "n_texts n_read d_model"]:
    """:func:`_last_positions_mean` of the texts ``[u0, s0, u1, s1, …]``, each pair's common prefix run once.

    Each pair becomes one row, ``prefix | rest of u | rest of s``, run with a 4-D attention mask (each rest
    sees the prefix and itself, never the other rest) and position ids that restart both rests where the
    prefix ends: every token gets exactly the keys and positions it has in its own text, the prefix is
    computed once, and the two answers need no padding to a common length. Models whose positions do not
    come from position ids (ALiBi), or with a sliding window the texts outgrow, run every text whole.
    """
    texts = [t for pair in pairs for t in pair]
    ids = token_ids(model.tokenizer, texts)
    config = model.original_model.config
    # Local attention windows (Mistral-style `sliding_window`, GPT-Neo's `window_size`) are not in the packed
    # mask: harmless only while every text fits in them.
    windows = [w for w in (getattr(config, key, None) for key in ("sliding_window", "window_size")) if isinstance(w, int)]
    if model.cfg.positional_embedding_type not in ("rotary", "standard") or any(max(map(len, ids)) > w for w in windows):
        return _last_positions_mean(model, texts, batch_size, n_last, n_read=n_read)
    states = torch.empty(len(texts), n_read, model.cfg.d_model)
    shared = [_common_prefix(ids[2 * i], ids[2 * i + 1]) for i in range(len(pairs))]
    # Rows of similar length waste less compute on padding.
    order = sorted(range(len(pairs)), key=lambda i: len(ids[2 * i]) + len(ids[2 * i + 1]) - shared[i])
    per_batch = max(1, batch_size // 2)
    for start in range(0, len(order), per_batch):
        batch = order[start : start + per_batch]
        rows = [j for i in batch for j in (2 * i, 2 * i + 1)]
        states[rows] = _packed_pairs(model, [(ids[2 * i], ids[2 * i + 1]) for i in batch], [shared[i] for i in batch], n_last, n_read)
    return states


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Tokens both texts start with, leaving each at least one of its own (its last token is always read)."""
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n


def _packed_pairs(
    model: TransformerBridge, pairs: list[tuple[list[int], list[int]]], shared: list[int], n_last: int | None, n_read: int
) -> Float[Tensor, "rows n_read d_model"]:
    """States of ``[u0, s0, u1, s1, …]`` from one forward pass, pair k packed in row k (see :func:`_pair_states`)."""
    width = max(len(u) + len(s) - c for (u, s), c in zip(pairs, shared))
    # Padding columns are masked out and never read, so any token id fills them (no pad token is needed).
    tokens = torch.zeros(len(pairs), width, dtype=torch.long)
    segment = torch.full((len(pairs), width), -1)  # 0 shared prefix, 1 rest of u, 2 rest of s, -1 padding
    position = torch.zeros(len(pairs), width, dtype=torch.long)  # the token's index in its own text
    for k, ((u, s), c) in enumerate(zip(pairs, shared)):
        end_u, end = len(u), len(u) + len(s) - c
        tokens[k, :end] = torch.tensor(u + s[c:])
        segment[k, :c], segment[k, c:end_u], segment[k, end_u:end] = 0, 1, 2
        position[k, :end_u] = torch.arange(end_u)
        position[k, end_u:end] = torch.arange(c, len(s))
    # Each text's read window: its last n_last tokens (all if None), wherever they sit in the row.
    weights = torch.zeros(len(pairs), width, 2)
    for text, rest in enumerate((1, 2)):
        length = torch.tensor([len(pair[text]) for pair in pairs])[:, None]
        first = torch.zeros_like(length) if n_last is None else (length - n_last).clamp(min=0)
        weights[:, :, text] = (((segment == 0) | (segment == rest)) & (position >= first)).float()
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    sees = (position[:, None, :] <= position[:, :, None]) & (k_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))
    sees |= torch.eye(width, dtype=torch.bool)  # a padding column attends to itself: no all-masked softmax rows
    device = model.cfg.device
    # Additive, in the model's dtype: attention code that adds the mask to the scores (Hugging Face's eager
    # OPT, GPT-J, GPT-Neo, which some bridges call) would add a boolean one as 1/0 and mask nothing.
    dtype = next(model.original_model.parameters()).dtype
    mask = torch.zeros(sees.shape, dtype=dtype).masked_fill_(~sees, torch.finfo(dtype).min)[:, None]
    # A 4-D mask is taken as given by transformers and by the bridge's attention.
    sums = _read_windows(model, weights, n_read, input_ids=tokens.to(device), attention_mask=mask.to(device),
                         position_ids=position.to(device))
    return (sums / weights.sum(1)[:, :, None, None]).flatten(0, 1)


class _ReadDone(Exception):
    """Raised by the deepest read hook: the blocks above it are not needed."""


def _read_windows(
    model: TransformerBridge, weights: Float[Tensor, "batch pos k"], n_read: int, **inputs: Tensor
) -> Float[Tensor, "batch k n_read d_model"]:
    """Window sums (:func:`_window_sum`) of the residual after blocks ``0..n_read-1``, on the CPU.

    One pass of the backbone (the unembedding over every position is not needed to read the residual),
    cut short after block ``n_read - 1``.
    """
    sums = torch.zeros(weights.shape[0], weights.shape[2], n_read, model.cfg.d_model)
    read = weights.to(model.cfg.device)

    def add(x: Tensor, hook, layer: int) -> Tensor:
        sums[:, :, layer] = _window_sum(read, x).cpu()
        if layer == n_read - 1 and n_read < model.cfg.n_layers:
            raise _ReadDone
        return x

    hooks = [(READ_HOOK.format(layer=layer), lambda x, hook, layer=layer: add(x, hook, layer)) for layer in range(n_read)]
    with model.hooks(fwd_hooks=hooks):
        try:
            model.original_model.base_model(**inputs, use_cache=False)
        except _ReadDone:
            pass
    return sums


def _window_sum(
    weights: Float[Tensor, "batch pos k"], x: Float[Tensor, "batch pos d_model"]
) -> Float[Tensor, "batch k d_model"]:
    """``out[b, k] = sum_pos weights[b, pos, k] * x[b, pos]`` in fp32, as one batched matmul.

    Multiplying then summing over positions costs about 7× more on CPU (a strided reduction), and this
    runs once per layer and forward pass.
    """
    return torch.bmm(weights.transpose(1, 2), x.float())


def _window_weights(mask: Int[Tensor, "batch pos"], n_last: int | None) -> Float[Tensor, "batch pos 1"]:
    """1.0 on each row's last ``n_last`` real tokens (every real token if None), 0.0 elsewhere.

    Counting real tokens from the right end makes the window the same under left or right padding,
    and a text shorter than the window averages its own tokens only, never pads.
    """
    if n_last is None:
        return mask[:, :, None].float()
    from_end = mask.flip(-1).cumsum(-1).flip(-1)  # real tokens at or after each position
    return (mask.bool() & (from_end <= n_last))[:, :, None].float()
