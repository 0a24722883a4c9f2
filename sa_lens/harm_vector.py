"""The harm vector τH = θH − θb and its top-k trim (Harm Direction Removal, paper §3.1 / paper-notes.md §2).

A harm vector is keyed by the checkpoint's own parameter names (``model.layers.3.mlp.down_proj.weight``),
never by TransformerLens aliases, so one vector applies to a bridge, a plain HF model or a state dict.
Arithmetic is fp32 whatever the checkpoint dtype (τH entries are ~1e-4; bf16 would round them away).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from sa_lens.artifacts import load_tensors, save_tensors
from sa_lens.bridge import is_bridge
from sa_lens.checkpoints import (
    Checkpoint,
    check_same_layout,
    check_same_names,
    paired_names,
    stream_pairs,
    stream_pieces,
)
from sa_lens.errors import InputError
from sa_lens.parameter_names import checkpoint_name, layer_index, select_names
from sa_lens.provenance import model_name
from sa_lens.sparse_delta import SparseDelta, compact
from sa_lens.topk import Count, check_count, check_top_k, trim_stream, whole_tensors

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["HarmVector", "Scope", "checkpoint_parameters"]

FILE_FORMAT = "sa_lens.harm_vector"
Scope = Literal["global", "per_layer", "per_tensor"]
Delta = Float[Tensor, "..."] | SparseDelta

ModelLike = Union["TransformerBridge", nn.Module, Mapping[str, Tensor]]


def architecture_state_names(model: nn.Module) -> frozenset[str] | None:
    """The names in the state dict of ``model``'s own architecture, or None for a module without an HF config.

    Built once per (class, config) on the meta device, so it costs no memory whatever the model's size. A bridge
    mounts views of the checkpoint's tensors under names of its own — GPT-2's fused ``c_attn`` and Phi-3's
    ``qkv_proj`` also appear split into q / k / v parameters sharing their storage, and an unembedding bias
    buffer sits on ``lm_head`` —, so only these names are the checkpoint's.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    return _state_names(type(model), config.to_json_string())


@functools.lru_cache(maxsize=8)
def _state_names(cls: type, config_json: str) -> frozenset[str]:
    config = cls.config_class.from_dict(json.loads(config_json))
    with torch.device("meta"):
        return frozenset(cls(config).state_dict())


def checkpoint_parameters(model: ModelLike) -> dict[str, Tensor]:
    """Map checkpoint parameter names to the live tensors of a bridge, an HF model or a state dict.

    Tied weights appear once (``named_parameters`` de-duplicates shared tensors), so an edit is never
    applied twice to the same storage; on an HF model (a bridge's included) only the names of the
    architecture's own state dict are kept (:func:`architecture_state_names`), so a bridge's split views of a
    fused weight are not counted beside it.

    Raises:
        ValueError: the bridge's weights were processed by ``enable_compatibility_mode()`` (folded /
            centred): raw-checkpoint coordinates no longer describe them.
        TypeError: an unsupported model type.
    """
    if is_bridge(model):
        if getattr(model, "_weights_processed", False):
            raise InputError(
                "This bridge's weights were folded/centred by enable_compatibility_mode(), so a harm vector in "
                "raw checkpoint coordinates does not apply to them. Apply the vector before "
                "enable_compatibility_mode(), or load a fresh bridge with sa_lens.load_model()."
            )
        model = model.original_model
    if isinstance(model, nn.Module):
        own = architecture_state_names(model)
        if own is None:
            return {checkpoint_name(name): p for name, p in model.named_parameters()}
        # Every path of every tensor, each tensor kept once under its first name in the architecture's own state
        # dict: a bridge may list a weight first under an alias of its own (Phi-3's o_proj as attn.o).
        out: dict[str, Tensor] = {}
        seen: set[int] = set()
        for name, p in model.named_parameters(remove_duplicate=False):
            key = checkpoint_name(name)
            if key in own and id(p) not in seen:
                seen.add(id(p))
                out[key] = p
        return out
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


def _check_finite(name: str, t: Tensor) -> None:
    if not torch.isfinite(t).all():
        raise InputError(
            f"Harm vector entry '{name}' holds NaN or inf. Check both checkpoints for non-finite weights "
            "(e.g. a diverged fine-tune) before building τH."
        )


def _trim_meta(meta: dict, top_k: float, scope: str, count: str) -> dict:
    # "count" is recorded only when not the default, so vectors trimmed as before keep their sidecars and hashes.
    kept = {k: v for k, v in meta.items() if k != "count"}  # a re-trim replaces an earlier trim's count
    return kept | {"top_k": float(top_k), "scope": scope} | ({"count": count} if count != "official" else {})


def scope_grouping(scope: Scope) -> Callable[[str], str]:
    """The top-k trim's grouping: a parameter name → the key of the group its entries are ranked in (one group for
    ``global``, the official code's rule, paper-notes §2.3; one per decoder layer for ``per_layer``; one per tensor
    for ``per_tensor``).

    Raises:
        InputError: an unknown scope.
    """
    if scope == "global":
        return lambda name: "all"
    if scope == "per_tensor":
        return lambda name: name
    if scope == "per_layer":
        return lambda name: f"layer.{layer_index(name)}"  # "layer.None": every parameter outside the layers
    raise InputError(f"scope must be 'global', 'per_layer' or 'per_tensor'; got {scope!r}.")


@dataclass
class HarmVector:
    """τH = θH − θb per parameter, fp32, keyed by checkpoint parameter names.

    Attributes:
        deltas: ``{name: Float[Tensor, "*shape"] | SparseDelta}``, fp32, zero where trimmed away. Built in
            memory the entries are dense tensors; a streaming build (:meth:`from_checkpoints`) or
            ``load(sparse=True)`` holds trimmed entries as :class:`~sa_lens.sparse_delta.SparseDelta`
            (flat int64 indices + fp32 values). :meth:`dense` gives either as a tensor.
        meta: provenance (base and harmful model names, ``top_k``, ``scope``, restrictions).

    Source: paper eq. for τH (§3.1, paper-notes.md §2.1); the official code's TIES variant equals a
    global top-k magnitude trim when there is one task vector (paper-notes.md §2.3).
    """

    deltas: dict[str, Delta]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, t in self.deltas.items():
            if t.dtype != torch.float32:
                raise InputError(f"Harm vector entry '{name}' is {t.dtype}; τH is stored in float32.")
            _check_finite(name, t.values if isinstance(t, SparseDelta) else t)

    @classmethod
    def from_models(
        cls,
        base: ModelLike,
        harmful: ModelLike,
        *,
        layers: Collection[int] | None = None,
        kinds: Collection[str] | None = None,
    ) -> HarmVector:
        """Build τH = θH − θb from two models of the same architecture (bridges, HF models or state dicts).

        Args:
            base: θb, the model the harmful one was fine-tuned from.
            harmful: θH, fine-tuned on harmful question–answer pairs.
            layers: keep only parameters of these decoder layers (the EDIT scenario's edit area,
                paper-notes.md §2.4); None keeps all.
            kinds: keep only these parameter kinds (``"attention"``, ``"mlp"``, ``"embeddings"``,
                ``"norms"``, ``"other"``); None keeps all.

        Returns:
            The untrimmed harm vector (the paper's "task vector" baseline, HDR‡), dense fp32.

        Raises:
            ValueError: parameter names, shapes or dtypes differ (message lists the first differences),
                a difference is not finite, or an unknown kind.
        """
        pb, ph = checkpoint_parameters(base), checkpoint_parameters(harmful)
        check_same_names(pb, ph)
        deltas = {}
        with torch.no_grad():
            for name in select_names(pb, layers, kinds):
                b, h = pb[name], ph[name]
                check_same_layout(name, b.shape, h.shape, b.dtype, h.dtype)
                deltas[name] = h.detach().float().cpu() - b.detach().float().cpu()
        meta = {"base": model_name(base), "harmful": model_name(harmful), "top_k": None, "scope": None}
        return cls(deltas, _with_restriction(meta, layers, kinds))

    @classmethod
    def from_checkpoints(
        cls,
        base: str | os.PathLike,
        harmful: str | os.PathLike,
        *,
        top_k: float | None = None,
        scope: Scope = "global",
        count: Count = "official",
        layers: Collection[int] | None = None,
        kinds: Collection[str] | None = None,
        progress: bool = True,
    ) -> HarmVector:
        """Build (and trim) τH = θH − θb streaming from two safetensors checkpoint folders.

        Only a piece of one tensor pair (whole rows, about 8M entries) is in memory at a time, each read
        once: the exact top-k threshold is found in the same single pass by a running radix select
        (:mod:`sa_lens.topk`), and only about the kept entries are held, as sparse indices + values.
        Integer and bool buffers are skipped; a tied output embedding is counted once (``tie_word_embeddings``);
        arithmetic is fp32 whatever the stored dtype. The result equals
        ``from_models(...).trim(top_k, scope, count)`` entry for entry.

        Args:
            base: θb's folder (``model.safetensors`` or a sharded ``model.safetensors.index.json``).
            harmful: θH's folder, same architecture.
            top_k: fraction kept, in (0, 1]; None keeps the full task vector, dense (4 bytes per
                parameter: 27 GB for a 7B model — trim unless you need HDR‡).
            scope: where the top-k threshold is computed, as in :meth:`trim`.
            count: which entries the top-k keeps, as in :meth:`trim` (:mod:`sa_lens.topk` states both rules).
            layers: keep only these decoder layers (see :func:`~sa_lens.edit_area.detect_edit_area`).
            kinds: keep only these parameter kinds (attention, mlp, embeddings, norms, other).
            progress: a tqdm bar over the parameters read.

        Returns:
            The harm vector; trimmed entries are :class:`~sa_lens.sparse_delta.SparseDelta` when
            under a third of the tensor is kept.

        Raises:
            FileNotFoundError: a folder or a shard named in an index is missing.
            ValueError: pickle-only checkpoints, corrupted files, names/shapes/dtypes that differ, a
                non-finite difference, ``top_k`` outside (0, 1] or an unknown scope, count or kind.
        """
        if top_k is not None:
            check_top_k(top_k)
            check_count(count)
        group_of = scope_grouping(scope)
        cb, ch = Checkpoint(base), Checkpoint(harmful)
        names = paired_names(cb, ch, layers, kinds)
        meta = {"base": str(base), "harmful": str(harmful), "top_k": None, "scope": None}
        meta = _with_restriction(meta, layers, kinds)
        if top_k is None:
            pairs = tqdm(stream_pairs(cb, ch, names), total=len(names), desc="τH", unit="tensor", disable=not progress)
            return cls(dict(pairs), meta)
        shapes = {n: cb.specs[n].shape for n in names}
        kept = trim_stream(lambda: stream_pieces(cb, ch, names), shapes, group_of, top_k, progress, count=count)
        deltas = {n: compact(e.indices, e.values, e.shape) for n, e in kept.items()}
        return cls(deltas, _trim_meta(meta, top_k, scope, count))

    def __len__(self) -> int:
        return len(self.deltas)

    def __repr__(self) -> str:
        # Provenance without the tensors: which models, how it was trimmed, how much of it is non-zero.
        keys = ("base", "harmful", "top_k", "scope", "count", "layers", "kinds")
        meta = "".join(f", {k}={self.meta[k]!r}" for k in keys if self.meta.get(k) is not None)
        return f"HarmVector(tensors={len(self)}, numel={self.numel:,}, nnz={self.nnz:,}{meta})"

    def __iter__(self) -> Iterator[str]:
        return iter(self.deltas)

    def items(self):
        return self.deltas.items()

    def dense(self, name: str) -> Float[Tensor, "..."]:
        """Entry ``name`` as a dense fp32 tensor (a view of it when stored dense)."""
        t = self.deltas[name]
        return t.to_dense() if isinstance(t, SparseDelta) else t

    def sparse(self, name: str) -> SparseDelta:
        """Entry ``name`` as flat indices + values (what an edit touches)."""
        t = self.deltas[name]
        return t if isinstance(t, SparseDelta) else SparseDelta.from_dense(t)

    @property
    def numel(self) -> int:
        """Number of entries over all parameters."""
        return sum(t.numel if isinstance(t, SparseDelta) else t.numel() for t in self.deltas.values())

    @property
    def nnz(self) -> int:
        """Number of non-zero entries (what an edit touches and a restore saves)."""
        return sum(
            int(torch.count_nonzero(t.values if isinstance(t, SparseDelta) else t)) for t in self.deltas.values()
        )

    def restrict(self, layers: Collection[int] | None = None, kinds: Collection[str] | None = None) -> HarmVector:
        """Keep only the parameters of some layers and/or kinds (zero elsewhere: the paper's edit-area mask,
        Eqs. 11–13, paper-notes.md §2.4 and §7.6). Trim after restricting to trim within the area.

        Raises:
            ValueError: an unknown kind or a negative layer.
        """
        kept = select_names(self.deltas, layers, kinds)
        return HarmVector({n: self.deltas[n] for n in kept}, _with_restriction(dict(self.meta), layers, kinds))

    def trim(self, top_k: float, scope: Scope = "global", count: Count = "official") -> HarmVector:
        """Keep the entries of τH with the largest magnitude, zero the rest (HDR; paper-notes.md §2.1, §2.3).

        Which entries are kept, exactly, is stated once in :mod:`sa_lens.topk`: by default the official
        code's ``kthvalue`` rule (⌊top_k·d⌋ + 1 entries per group, and every tie at the threshold), or, with
        ``count="exact"``, exactly ⌊top_k·d + ½⌋ with ties broken by name, then flat index. The threshold is
        found exactly by a radix select over float32 bit patterns, without concatenating the model.

        Args:
            top_k: fraction of entries kept, in (0, 1]; 0.10 keeps the top 10 % (the paper's default).
            scope: threshold computed once over all parameters (the paper's choice), per transformer
                layer (parameters outside layers form one group), or per tensor (mergekit's choice).
            count: ``"official"`` (the default, the lab's numbers) or ``"exact"``.

        Returns:
            A new HarmVector with the same keys, shapes and dtype float32; dense entries stay dense,
            a vector holding sparse entries comes back sparse where under a third is kept.

        Raises:
            ValueError: ``top_k`` not in (0, 1], an unknown scope or an unknown count.
        """
        group_of = scope_grouping(scope)  # top_k and count are checked by trim_stream, before any work
        shapes = {n: tuple(t.shape) for n, t in self.deltas.items()}
        kept = trim_stream(lambda: whole_tensors((n, self.dense(n)) for n in shapes), shapes, group_of, top_k,
                           count=count)
        all_dense = not any(isinstance(t, SparseDelta) for t in self.deltas.values())
        trimmed = {
            n: SparseDelta(e.shape, e.indices, e.values).to_dense() if all_dense else compact(e.indices, e.values, e.shape)
            for n, e in kept.items()
        }
        return HarmVector(trimmed, _trim_meta(self.meta, top_k, scope, count))

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

        Raises:
            ValueError: two parameters would be stored under one key (``w`` sparse and ``w.values``).
        """
        tensors, encoding, shapes = {}, {}, {}
        for name, t in self.deltas.items():
            sparse = t if isinstance(t, SparseDelta) else SparseDelta.from_dense(t)
            shapes[name] = list(sparse.shape)
            if isinstance(compact(sparse.indices, sparse.values, sparse.shape), SparseDelta):
                stored = {f"{name}.indices": sparse.indices, f"{name}.values": sparse.values}
                encoding[name] = "sparse"
            else:
                stored, encoding[name] = {name: self.dense(name)}, "dense"
            taken = sorted(set(stored) & set(tensors))
            if taken:  # the later tensor would silently replace the earlier one in the file
                raise InputError(
                    f"'{name}' would be stored as '{taken[0]}', the key of another parameter's tensor; rename one."
                )
            tensors.update(stored)
        sidecar = {
            "format": FILE_FORMAT,
            "space": "raw checkpoint weights",
            "meta": self.meta,
            "lam_suggested": lam,
            "dtype": "float32",
            "names_sha256": _names_hash(shapes),
            "shapes": shapes,
            "encoding": encoding,
        }
        return save_tensors(path, tensors, sidecar)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        target: ModelLike | str | os.PathLike | None = None,
        restrict: bool = False,
        sparse: bool = False,
    ) -> HarmVector:
        """Read a vector written by :meth:`save`; with ``target``, check it fits that model.

        Args:
            path: the ``.safetensors`` file.
            target: a bridge, HF model, state dict or safetensors checkpoint folder the vector will be
                applied to.
            restrict: keep only the parameters the target has (with equal shapes) instead of refusing.
            sparse: keep sparse-encoded entries as :class:`~sa_lens.sparse_delta.SparseDelta` (12 bytes
                per kept entry) instead of dense tensors (4 bytes per parameter).

        Returns:
            The harm vector.

        Raises:
            FileNotFoundError: no such file.
            ValueError: corrupted or foreign file, a tensor missing from the file, or (without
                ``restrict``) names/shapes that differ from ``target``'s; with ``restrict``, no parameter
                in common with ``target``.
        """
        tensors, sidecar = load_tensors(path, FILE_FORMAT)
        if sidecar.get("names_sha256") != _names_hash(sidecar["shapes"]):
            raise InputError(
                f"{path}: the parameter names/shapes in its JSON sidecar do not match the hash recorded with them; "
                "the sidecar was edited or corrupted. Re-save the vector with HarmVector.save."
            )
        deltas = {}
        for name, shape in sidecar["shapes"].items():
            keys = [f"{name}.indices", f"{name}.values"] if sidecar["encoding"][name] == "sparse" else [name]
            if any(k not in tensors for k in keys):
                raise InputError(f"{path}: tensor '{keys[0]}' listed in the sidecar is missing; the file is corrupted.")
            if sidecar["encoding"][name] == "sparse":
                entry = SparseDelta(tuple(shape), tensors[keys[0]], tensors[keys[1]])
                if entry.nnz and (int(entry.indices.min()) < 0 or int(entry.indices.max()) >= entry.numel):
                    raise InputError(f"{path}: indices of '{name}' fall outside its shape {shape}; the file is corrupted.")
                if not bool((entry.indices[1:] > entry.indices[:-1]).all()):
                    raise InputError(f"{path}: indices of '{name}' are not strictly increasing; the file is corrupted.")
                deltas[name] = entry if sparse else entry.to_dense()
            else:
                if tensors[name].numel() != math.prod(shape):
                    raise InputError(
                        f"{path}: '{name}' holds {tensors[name].numel()} entries, not the {shape} its sidecar "
                        "records; the file is corrupted."
                    )
                deltas[name] = tensors[name].view(shape)
        hv = cls(deltas, dict(sidecar["meta"]))
        if target is None:
            return hv
        if isinstance(target, (str, os.PathLike)):
            shapes = {n: spec.shape for n, spec in Checkpoint(target).specs.items()}
        else:
            shapes = {n: tuple(p.shape) for n, p in checkpoint_parameters(target).items()}
        fits = {n for n in deltas if n in shapes and tuple(shapes[n]) == tuple(sidecar["shapes"][n])}
        if len(fits) == len(deltas):
            return hv
        if not restrict:
            bad = sorted(set(deltas) - fits)
            raise InputError(
                f"{path}: {len(bad)} of {len(deltas)} parameters (e.g. '{bad[0]}') are missing from the target or "
                "have another shape: the vector was built for another architecture. Pass restrict=True to keep "
                "only the common part."
            )
        if not fits:
            raise InputError(
                f"{path}: none of its {len(deltas)} parameters (e.g. '{next(iter(deltas))}') is in the target with "
                "the same shape, so restrict=True would apply nothing; the vector is for another model."
            )
        return cls({n: deltas[n] for n in deltas if n in fits}, {**hv.meta, "restricted_to_target": True})


def _with_restriction(meta: dict, layers: Collection[int] | None, kinds: Collection[str] | None) -> dict:
    if layers is not None:
        meta["layers"] = sorted(layers)
    if kinds is not None:
        meta["kinds"] = sorted(kinds)
    return meta


def _names_hash(shapes: Mapping[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps({n: list(s) for n, s in sorted(shapes.items())}).encode()).hexdigest()
