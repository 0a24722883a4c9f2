"""The harm vector τH = θH − θb and its top-k trim (Harm Direction Removal, paper §3.1 / paper-notes.md §2).

A harm vector is keyed by the checkpoint's own parameter names (``model.layers.3.mlp.down_proj.weight``),
never by TransformerLens aliases, so one vector applies to a bridge, a plain HF model or a state dict.
Arithmetic is fp32 whatever the checkpoint dtype (τH entries are ~1e-4; bf16 would round them away).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.model_bridge import TransformerBridge

from sa_lens.artifacts import load_tensors, save_tensors

__all__ = ["HarmVector", "checkpoint_parameters"]

ORIGINAL_COMPONENT = "._original_component"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_INF_BITS = 0x7F800000  # bit pattern of +inf in float32: every finite |x| is below it
FILE_FORMAT = "sa_lens.harm_vector"
_SPARSE_BELOW = 1 / 3  # density under which indices + values (12 bytes/entry) beat a dense fp32 tensor

ModelLike = TransformerBridge | nn.Module | Mapping[str, Tensor]


def checkpoint_parameters(model: ModelLike) -> dict[str, Tensor]:
    """Map checkpoint parameter names to the live tensors of a bridge, an HF model or a state dict.

    Tied weights appear once (``named_parameters`` de-duplicates shared tensors), so an edit is never
    applied twice to the same storage.

    Raises:
        ValueError: the bridge's weights were processed by ``enable_compatibility_mode()`` (folded /
            centred): raw-checkpoint coordinates no longer describe them.
        TypeError: an unsupported model type.
    """
    if isinstance(model, TransformerBridge):
        if getattr(model, "_weights_processed", False):
            raise ValueError(
                "This bridge's weights were folded/centred by enable_compatibility_mode(), so a harm vector in "
                "raw checkpoint coordinates does not apply to them. Apply the vector before "
                "enable_compatibility_mode(), or load a fresh bridge with sa_lens.load_model()."
            )
        model = model.original_model
    if isinstance(model, nn.Module):
        return {name.replace(ORIGINAL_COMPONENT, ""): p for name, p in model.named_parameters()}
    if isinstance(model, Mapping):
        # A tied model's state_dict() names one storage twice (embed_tokens and lm_head): keep the first
        # name, as named_parameters() does, so the edit and the top-k count see each weight once.
        out, seen = {}, set()
        for k, v in model.items():
            if not (torch.is_tensor(v) and v.is_floating_point()):
                continue
            storage = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if storage not in seen:
                seen.add(storage)
                out[k] = v
        return out
    raise TypeError(f"Expected a TransformerBridge, an nn.Module or a state dict, got {type(model).__name__}.")


def _model_name(model: ModelLike) -> str:
    if isinstance(model, TransformerBridge):
        model = model.original_model
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or type(model).__name__)


def _check_finite(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(
            f"Harm vector entry '{name}' holds NaN or inf. Check both checkpoints for non-finite weights "
            "(e.g. a diverged fine-tune) before building τH."
        )


def _kth_smallest_abs(tensors: list[Tensor], m: int) -> float:
    """The m-th smallest |x| (1-based) over several tensors, exactly, without concatenating them.

    Non-negative float32 values sort like their int32 bit patterns, so a bisection over the 31-bit
    pattern space finds the exact order statistic in 31 counting passes, holding no copy of the model.
    """
    lo, hi = 0, _INF_BITS
    while lo < hi:
        mid = (lo + hi) // 2
        count = sum(int((t.abs().view(torch.int32) <= mid).sum()) for t in tensors)
        if count >= m:
            hi = mid
        else:
            lo = mid + 1
    return torch.tensor(lo, dtype=torch.int32).view(torch.float32).item()


@dataclass
class HarmVector:
    """τH = θH − θb per parameter, fp32, keyed by checkpoint parameter names.

    Attributes:
        deltas: ``{name: Float[Tensor, "*shape"]}``, fp32, zero where trimmed away.
        meta: provenance (base and harmful model names, ``top_k``, ``scope``).

    Source: paper eq. for τH (§3.1, paper-notes.md §2.1); the official code's TIES variant equals a
    global top-k magnitude trim when there is one task vector (paper-notes.md §2.3).
    """

    deltas: dict[str, Float[Tensor, "..."]]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, t in self.deltas.items():
            if t.dtype != torch.float32:
                raise ValueError(f"Harm vector entry '{name}' is {t.dtype}; τH is stored in float32.")
            _check_finite(name, t)

    @classmethod
    def from_models(cls, base: ModelLike, harmful: ModelLike) -> HarmVector:
        """Build τH = θH − θb from two models of the same architecture (bridges, HF models or state dicts).

        Args:
            base: θb, the model the harmful one was fine-tuned from.
            harmful: θH, fine-tuned on harmful question–answer pairs.

        Returns:
            The untrimmed harm vector (the paper's "task vector" baseline, HDR‡).

        Raises:
            ValueError: parameter names, shapes or dtypes differ (message lists the first differences),
                or a difference is not finite.
        """
        pb, ph = checkpoint_parameters(base), checkpoint_parameters(harmful)
        missing, extra = sorted(set(pb) - set(ph)), sorted(set(ph) - set(pb))
        if missing or extra:
            raise ValueError(
                "Base and harmful models have different parameter names "
                f"(only in base: {missing[:3]}{'…' if len(missing) > 3 else ''}; "
                f"only in harmful: {extra[:3]}{'…' if len(extra) > 3 else ''}). "
                "τH needs two checkpoints of the same architecture: fine-tune θH from θb."
            )
        deltas = {}
        with torch.no_grad():
            for name, b in pb.items():
                h = ph[name]
                if h.shape != b.shape:
                    raise ValueError(
                        f"Parameter '{name}' has shape {tuple(b.shape)} in base but {tuple(h.shape)} in harmful; "
                        "the two models must share one architecture and vocabulary."
                    )
                if h.dtype != b.dtype:
                    raise ValueError(
                        f"Parameter '{name}' is {b.dtype} in base but {h.dtype} in harmful; the difference would be "
                        "mostly rounding noise. Load both checkpoints in the same dtype (float32 recommended)."
                    )
                deltas[name] = h.detach().float().cpu() - b.detach().float().cpu()
        meta = {"base": _model_name(base), "harmful": _model_name(harmful), "top_k": None, "scope": None}
        return cls(deltas, meta)

    def __len__(self) -> int:
        return len(self.deltas)

    def __iter__(self) -> Iterator[str]:
        return iter(self.deltas)

    def items(self):
        return self.deltas.items()

    @property
    def numel(self) -> int:
        """Number of entries over all parameters."""
        return sum(t.numel() for t in self.deltas.values())

    @property
    def nnz(self) -> int:
        """Number of non-zero entries (what an edit touches and a restore saves)."""
        return sum(int(torch.count_nonzero(t)) for t in self.deltas.values())

    def _groups(self, scope: str) -> dict[str, list[str]]:
        if scope == "global":
            return {"all": list(self.deltas)}
        if scope == "per_tensor":
            return {n: [n] for n in self.deltas}
        groups: dict[str, list[str]] = {}
        for n in self.deltas:
            m = _LAYER.search(n)
            groups.setdefault(f"layer.{m.group(1)}" if m else "outside_layers", []).append(n)
        return groups

    def trim(self, top_k: float, scope: Literal["global", "per_layer", "per_tensor"] = "global") -> HarmVector:
        """Keep the entries of τH with the largest magnitude, zero the rest (HDR; paper-notes.md §2.1, §2.3).

        The threshold is the official code's: with d entries in a group, t = the (d − ⌊top_k·d⌋)-th
        smallest |τH| (what ``kthvalue`` over the concatenated group gives), and entries with
        |τH| ≥ t are kept, ties included. It is found exactly by bisection over float bit patterns,
        without concatenating the model.

        Args:
            top_k: fraction of entries kept, in (0, 1]; 0.10 keeps the top 10 % (the paper's default).
            scope: threshold computed once over all parameters (the paper's choice), per transformer
                layer (parameters outside layers form one group), or per tensor (mergekit's choice).

        Returns:
            A new HarmVector with the same keys, shapes and dtype float32.

        Raises:
            ValueError: ``top_k`` not in (0, 1] or an unknown scope.
        """
        if isinstance(top_k, bool) or not (isinstance(top_k, numbers.Real) and 0.0 < top_k <= 1.0):
            raise ValueError(f"top_k must be a fraction in (0, 1] (0.1 keeps the top 10 %); got {top_k!r}.")
        if scope not in ("global", "per_layer", "per_tensor"):
            raise ValueError(f"scope must be 'global', 'per_layer' or 'per_tensor'; got {scope!r}.")
        trimmed = {}
        for names in self._groups(scope).values():
            tensors = [self.deltas[n] for n in names]
            d = sum(t.numel() for t in tensors)
            m = d - int(top_k * d)
            if m == 0:
                trimmed.update({n: t.clone() for n, t in zip(names, tensors)})
                continue
            threshold = _kth_smallest_abs(tensors, m)
            for n, t in zip(names, tensors):
                trimmed[n] = torch.where(t.abs() >= threshold, t, torch.zeros((), dtype=t.dtype))
        return HarmVector(trimmed, {**self.meta, "top_k": float(top_k), "scope": scope})

    def save(self, path: str | os.PathLike, lam: float | None = None) -> Path:
        """Write the vector to ``path`` (safetensors) with a JSON sidecar beside it.

        Tensors sparser than 1/3 are stored as flat int64 indices + fp32 values (``{name}.indices``,
        ``{name}.values``), the rest densely. The sidecar records the base and harmful model names, a
        hash of the parameter names and shapes, dtype, ``top_k``, scope, the suggested λ and the sa_lens
        version.

        Args:
            path: a ``.safetensors`` path; the sidecar is the same path with ``.json``.
            lam: the λ you suggest applying it with (recorded, not used).

        Returns:
            The safetensors path.
        """
        tensors, encoding = {}, {}
        for name, t in self.deltas.items():
            flat = t.reshape(-1)
            idx = torch.nonzero(flat).squeeze(1)
            if idx.numel() < _SPARSE_BELOW * flat.numel():
                tensors[f"{name}.indices"], tensors[f"{name}.values"] = idx, flat[idx]
                encoding[name] = "sparse"
            else:
                tensors[name], encoding[name] = t, "dense"
        sidecar = {
            "format": FILE_FORMAT,
            "space": "raw checkpoint weights",
            "meta": self.meta,
            "lam_suggested": lam,
            "dtype": "float32",
            "names_sha256": _names_hash({n: t.shape for n, t in self.deltas.items()}),
            "shapes": {n: list(t.shape) for n, t in self.deltas.items()},
            "encoding": encoding,
        }
        return save_tensors(path, tensors, sidecar)

    @classmethod
    def load(cls, path: str | os.PathLike, target: ModelLike | None = None, restrict: bool = False) -> HarmVector:
        """Read a vector written by :meth:`save`; with ``target``, check it fits that model.

        Args:
            path: the ``.safetensors`` file.
            target: a bridge, HF model or state dict the vector will be applied to.
            restrict: keep only the parameters the target has (with equal shapes) instead of refusing.

        Returns:
            The harm vector, dense in memory.

        Raises:
            FileNotFoundError: no such file.
            ValueError: corrupted or foreign file, a tensor missing from the file, or (without
                ``restrict``) names/shapes that differ from ``target``'s.
        """
        tensors, sidecar = load_tensors(path, FILE_FORMAT)
        deltas = {}
        for name, shape in sidecar["shapes"].items():
            keys = [f"{name}.indices", f"{name}.values"] if sidecar["encoding"][name] == "sparse" else [name]
            if any(k not in tensors for k in keys):
                raise ValueError(f"{path}: tensor '{keys[0]}' listed in the sidecar is missing; the file is corrupted.")
            if sidecar["encoding"][name] == "sparse":
                dense = torch.zeros(math.prod(shape), dtype=torch.float32)
                dense[tensors[keys[0]]] = tensors[keys[1]]
                deltas[name] = dense.view(shape)
            else:
                deltas[name] = tensors[name].view(shape)
        hv = cls(deltas, dict(sidecar["meta"]))
        if target is None:
            return hv
        params = checkpoint_parameters(target)
        fits = {n for n, t in deltas.items() if n in params and params[n].shape == t.shape}
        if len(fits) == len(deltas):
            return hv
        if not restrict:
            bad = sorted(set(deltas) - fits)
            raise ValueError(
                f"{path}: {len(bad)} of {len(deltas)} parameters (e.g. '{bad[0]}') are missing from the target or "
                "have another shape: the vector was built for another architecture. Pass restrict=True to keep "
                "only the common part."
            )
        return cls({n: deltas[n] for n in deltas if n in fits}, {**hv.meta, "restricted_to_target": True})


def _names_hash(shapes: Mapping[str, torch.Size]) -> str:
    return hashlib.sha256(json.dumps({n: list(s) for n, s in sorted(shapes.items())}).encode()).hexdigest()
