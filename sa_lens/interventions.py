"""One protocol for every model state: a small typed config that applies itself and restores bit-exactly.

Each intervention is a frozen dataclass, validated on construction, with

- ``apply(model)``: a context manager that puts a ``TransformerBridge`` in the state and takes it back out on
  exit, also after an exception (weights restored bit for bit, hooks removed);
- ``fingerprint()``: a hash of **every** parameter (vector contents, λ, α, site, layers, …), so resumed
  evaluation records are never shared between two configurations (the resume key of :func:`sa_lens.evaluate`);
- ``name``: a short human-readable label;
- ``to_dict()`` / :func:`from_dict`: a JSON form (vectors by content hash) and back; :func:`save` / :func:`load`
  write and read a config with its vectors (safetensors) so a state can be shipped to another process.

The paper's states (paper §3, paper-notes.md §2–3)::

    Original           = Compose([])
    HDR                = HarmRemoval(hv, lam)                   # θ̂ = θt − λ·τH′ (Eq. 4)
    Safe-Align         = SafeAlign(pairs=pairs, alpha=α)        # ICV read from the model as it is, then injected
    Safety Arithmetic  = Compose([HarmRemoval(hv, lam), SafeAlign(pairs=pairs, alpha=α)])   # ICV read from θ̂

the EDIT scenario's edited model (paper §4): :class:`KnowledgeEdit` (ROME, Meng et al. 2022), and the analyses'
ablations: :class:`DirectionalAblation` (Arditi et al. 2024) and :class:`HeadAblation`.
Design after mergekit's method registry and steering-vectors' ``SteeringVector.apply``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import os
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from sa_lens.defaults import DEFAULT_ALPHA, DEFAULT_LAM
from sa_lens.edit_requests import EditRequest
from sa_lens.editing import RomeOptions, _batch, _hf_and_tokenizer, _requests, knowledge_edit
from sa_lens.errors import InputError
from sa_lens.harm_removal import check_lam, harm_removal
from sa_lens.harm_vector import HarmVector
from sa_lens.head_ablation import ablate_heads_hooks
from sa_lens.layer_spec import check_layers
from sa_lens.mlp_projection import mlp_output
from sa_lens.prompts import format_prompts, tokenize_left_padded
from sa_lens.provenance import model_name, portable_name
from sa_lens.safety_vector import SafetyVector, processing_mode
from sa_lens.sparse_delta import SparseDelta
from sa_lens.steering import SITES, check_steering_options, check_vector_fits, safety_hooks

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

__all__ = [
    "INTERVENTIONS",
    "Compose",
    "DirectionalAblation",
    "HarmRemoval",
    "HeadAblation",
    "Intervention",
    "KnowledgeEdit",
    "SafeAlign",
    "from_dict",
    "load",
    "save",
    "vector_digest",
]

FORMAT = "sa_lens.intervention/1"


# ---- vector identity ---------------------------------------------------------------------------------------

# id → (weak reference, digest): a vector is hashed once (treated as immutable from then on), and a cached
# entry never keeps a large vector alive.
_DIGESTS: dict[int, tuple[weakref.ref, str]] = {}


def _update(h: Any, t: Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)};".encode())
    h.update(t.view(torch.uint8).numpy() if t.numel() else b"")


def vector_digest(vector: HarmVector | SafetyVector | Tensor, fresh: bool = False) -> str:
    """SHA-256 (first 16 hex digits) of a vector's names, shapes and stored values.

    A harm vector is hashed in the form it is held (dense tensors or sparse indices + values), so a dense
    vector and its sparse copy have different digests: a resume then redoes work rather than mixing
    configurations. The digest of an object is computed once and cached: do not edit a vector in place after
    using it in an intervention. ``fresh=True`` hashes the contents again (and caches that): what loading and
    saving do, so a vector edited in place is caught there.
    """
    cached = _DIGESTS.get(id(vector))
    if not fresh and cached is not None and cached[0]() is vector:
        return cached[1]
    digest = _content_digest(vector)
    _DIGESTS[id(vector)] = (weakref.ref(vector), digest)
    weakref.finalize(vector, _DIGESTS.pop, id(vector), None)
    return digest


def _content_digest(vector: HarmVector | SafetyVector | Tensor) -> str:
    h = hashlib.sha256()
    if isinstance(vector, HarmVector):
        for name in sorted(vector.deltas):
            h.update(f"{name}:".encode())
            t = vector.deltas[name]
            if isinstance(t, SparseDelta):
                h.update(f"sparse{tuple(t.shape)}".encode())
                _update(h, t.indices)
                _update(h, t.values)
            else:
                _update(h, t)
    elif isinstance(vector, SafetyVector):
        _update(h, vector.directions)
    elif torch.is_tensor(vector):
        _update(h, vector)
    else:
        raise InputError(f"vector_digest takes a HarmVector, SafetyVector or tensor, got {type(vector).__name__}.")
    return h.hexdigest()[:16]


def _hash(obj: Any) -> str:
    # ASCII JSON: any string, lone surrogates included, hashes; the digest does not depend on the platform.
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=True).encode()).hexdigest()[:16]


def _index(x: Any, what: str) -> int:
    """An int index (Python or numpy integer); bools, floats and strings are refused, not coerced."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise InputError(f"{what} must be integer indices; got {x!r} ({type(x).__name__}).")
    return int(x)


def _flag(x: Any, what: str) -> bool:
    if not isinstance(x, bool):
        raise InputError(f"{what} must be True or False; got {x!r}.")
    return x


def _layers(layers: Sequence[int] | None, what: str) -> tuple[int, ...] | None:
    """Layers as a sorted tuple of distinct ints (None stays None); refuses bools, negatives and empties."""
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise InputError(f"{what} must be a sequence of layer indices such as (4, 5, 6); got {layers!r}. Parse "
                         "'4-6' with sa_lens.parse_layers.")
    out = tuple(sorted({_index(x, what) for x in list(layers)}))
    if not out or out[0] < 0:
        raise InputError(f"{what} must be a non-empty set of layer indices ≥ 0; got {layers!r}.")
    return out


def _check_layers_fit(layers: tuple[int, ...] | None, model: TransformerBridge, what: str) -> None:
    if layers is not None:
        check_layers(layers, model.cfg.n_layers, what)


class Intervention(ABC):
    """What every model state offers: ``name``, ``to_dict``, ``vectors``, ``check``, ``fingerprint``, ``apply``.

    Equality and hashing go by fingerprint, so two configs that would run the same way are equal.
    """

    kind: ClassVar[str]

    @property
    @abstractmethod
    def name(self) -> str:
        """A short human-readable label (``HDR λ=3``)."""

    @abstractmethod
    def to_dict(self) -> dict:
        """Every parameter as JSON-able values, vectors by digest (:func:`from_dict` rebuilds it)."""

    @abstractmethod
    def apply(self, model: TransformerBridge) -> contextlib.AbstractContextManager[TransformerBridge]:
        """Put ``model`` in this state inside a ``with`` block; undone exactly on exit, also after an exception."""

    def vectors(self) -> dict[str, HarmVector | SafetyVector]:
        """Digest → the vectors this config holds (what :func:`save` writes beside its JSON)."""
        return {}

    @abstractmethod
    def check(self, model: TransformerBridge) -> None:
        """Raise InputError if this config cannot apply to ``model`` (sizes, vectors, mode); changes nothing.

        :func:`sa_lens.evaluate` calls it for every state before generating anything.
        """

    def fingerprint(self) -> str:
        """16 hex digits over every parameter of the config (vectors by content)."""
        return _hash(self.to_dict())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Intervention) and self.fingerprint() == other.fingerprint()

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.fingerprint()}>"


# ---- the interventions -------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class HarmRemoval(Intervention):
    """HDR: θ̂ = θt − λ·τH′ edited in place, restored bit-exactly on exit (paper §3.1, Eq. 4).

    Attributes:
        harm_vector: τH′, dense or sparse, keyed by checkpoint parameter names (:class:`HarmVector`).
        lam: λ, dimensionless (default :data:`sa_lens.defaults.DEFAULT_LAM`, the paper's 3).
        layers: only the parameters of these transformer layers (the EDIT scenario's edit area, a
            layer-wise ablation); None = the whole vector.

    Raises:
        ValueError: (on construction) λ not finite, or bad layers; (on apply) a vector that does not fit the
            model, or a bridge whose weights were processed by ``enable_compatibility_mode()``.
    """

    harm_vector: HarmVector
    lam: float = DEFAULT_LAM
    layers: tuple[int, ...] | None = None
    kind: ClassVar[str] = "harm_removal"

    def __post_init__(self) -> None:
        if not isinstance(self.harm_vector, HarmVector):
            raise InputError(f"HarmRemoval needs a HarmVector, got {type(self.harm_vector).__name__}.")
        check_lam(self.lam)
        object.__setattr__(self, "lam", float(self.lam))
        object.__setattr__(self, "layers", _layers(self.layers, "HarmRemoval layers"))

    @property
    def name(self) -> str:
        where = "" if self.layers is None else f" L{','.join(map(str, self.layers))}"
        return f"HDR λ={self.lam:g}{where}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "harm_vector": vector_digest(self.harm_vector), "lam": self.lam,
                "layers": None if self.layers is None else list(self.layers)}

    def vectors(self) -> dict[str, HarmVector | SafetyVector]:
        return {vector_digest(self.harm_vector): self.harm_vector}

    def _vector(self) -> HarmVector:
        hv = self.harm_vector if self.layers is None else self.harm_vector.restrict(layers=self.layers)
        if not hv.deltas:
            raise InputError(f"the harm vector has no parameters in layers {list(self.layers or ())}.")
        return hv

    def check(self, model: TransformerBridge) -> None:
        harm_removal(model, self._vector(), self.lam)  # resolves names, shapes and the weights' mode; edits nothing

    @contextlib.contextmanager
    def apply(self, model: TransformerBridge) -> Iterator[TransformerBridge]:
        with harm_removal(model, self._vector(), self.lam):
            yield model


@dataclass(frozen=True, eq=False, repr=False)
class SafeAlign(Intervention):
    """Safe-Align: the in-context safety vector (ICV) injected by named hooks (paper §3.2, Eq. 7–9).

    Give either a ready ``vector`` or demonstration ``pairs``; from pairs the ICV is read from the model *as it
    is when the intervention is applied*, so inside :class:`Compose` after :class:`HarmRemoval` it is read
    from θ̂, as the paper does (Safety Arithmetic).

    Attributes:
        vector: a :class:`SafetyVector` ``[n_layers, d_model]`` (residual-stream units).
        pairs: ``(unsafe_text, safe_text)`` demonstration pairs (see :func:`sa_lens.demonstration_text`).
        alpha: α (default :data:`sa_lens.defaults.DEFAULT_ALPHA`); for ``official`` the step is
            0.1·α·(1 + relu(cos)), for ``add`` α in activation units.
        site: ``mlp_out`` (official), ``attn_out``, ``resid_pre`` or ``resid_post``.
        formula: ``official``, ``add`` or ``ablate`` (see :func:`sa_lens.safety_hooks`).
        positions: ``all`` (official), ``prompt`` or ``generated``.
        layers: steered layers; None = all (BASE/SFT), the edit area for EDIT.
        per_layer_alpha: ``((layer, α), …)`` overriding α for some layers.
        icv_positions, icv_method, icv_layers: extraction options of :meth:`SafetyVector.from_pairs`
            (``pairs`` only): read window, PC1 + mean / PC1 / mean diff, layers the vector is computed over.
        allow_other_model: apply a ``vector`` read from a model of another name (same shape and processing
            mode); off by default, since a vector only means something in the coordinates it was read in.

    Raises:
        ValueError: (on construction) both or neither of vector and pairs, empty or malformed pairs, a
            non-finite α, an unknown site / formula / positions; (on apply) a vector of another shape,
            processing mode or model, or layers past the model's.
    """

    vector: SafetyVector | None = None
    pairs: tuple[tuple[str, str], ...] | None = None
    alpha: float = DEFAULT_ALPHA
    site: str = "mlp_out"
    formula: str = "official"
    positions: str = "all"
    layers: tuple[int, ...] | None = None
    per_layer_alpha: tuple[tuple[int, float], ...] = ()
    icv_positions: Literal["last4_mean", "last", "span"] = "last4_mean"
    icv_method: Literal["pca_plus_mean", "pca", "mean_diff"] = "pca_plus_mean"
    icv_layers: tuple[int, ...] | None = None
    allow_other_model: bool = False
    kind: ClassVar[str] = "safe_align"

    def __post_init__(self) -> None:
        if (self.vector is None) == (self.pairs is None):
            raise InputError("SafeAlign needs exactly one of vector= (a SafetyVector) or pairs= (demonstrations).")
        if self.vector is not None and not isinstance(self.vector, SafetyVector):
            raise InputError(f"SafeAlign vector must be a SafetyVector, got {type(self.vector).__name__}.")
        if self.pairs is not None:
            pairs = tuple(tuple(p) for p in self.pairs)
            if not pairs:
                raise InputError("SafeAlign pairs is empty; pass at least one (unsafe_text, safe_text) pair.")
            for i, p in enumerate(pairs):
                if len(p) != 2 or not all(isinstance(t, str) and t.strip() for t in p):
                    raise InputError(f"SafeAlign pairs[{i}] must be two non-empty strings (unsafe_text, safe_text).")
            object.__setattr__(self, "pairs", pairs)
        items = self.per_layer_alpha.items() if isinstance(self.per_layer_alpha, Mapping) else self.per_layer_alpha
        try:
            per_layer = {_index(k, "per_layer_alpha layers"): v for k, v in items}
        except (TypeError, ValueError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"per_layer_alpha must be (layer, α) pairs; got {self.per_layer_alpha!r}.") from None
        if any(k < 0 for k in per_layer):
            raise InputError(f"per_layer_alpha layers must be ≥ 0; got {sorted(per_layer)}.")
        check_steering_options(self.alpha, self.site, self.formula, self.positions, per_layer)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "per_layer_alpha", tuple((k, float(v)) for k, v in sorted(per_layer.items())))
        _flag(self.allow_other_model, "allow_other_model")
        object.__setattr__(self, "layers", _layers(self.layers, "SafeAlign layers"))
        object.__setattr__(self, "icv_layers", _layers(self.icv_layers, "SafeAlign icv_layers"))
        if self.icv_positions not in ("last4_mean", "last", "span"):
            raise InputError(f"icv_positions must be 'last4_mean', 'last' or 'span'; got {self.icv_positions!r}.")
        if self.icv_method not in ("pca_plus_mean", "pca", "mean_diff"):
            raise InputError(f"icv_method must be 'pca_plus_mean', 'pca' or 'mean_diff'; got {self.icv_method!r}.")

    @property
    def name(self) -> str:
        where = "" if self.layers is None else f" L{','.join(map(str, self.layers))}"
        return f"Safe-Align α={self.alpha:g}{where}"

    def to_dict(self) -> dict:
        source: dict = (
            {"vector": vector_digest(self.vector)} if self.vector is not None
            else {"pairs": [list(p) for p in self.pairs or ()], "icv_positions": self.icv_positions,
                  "icv_method": self.icv_method,
                  "icv_layers": None if self.icv_layers is None else list(self.icv_layers)}
        )
        return {"kind": self.kind, **source, "alpha": self.alpha, "site": self.site, "formula": self.formula,
                "positions": self.positions, "layers": None if self.layers is None else list(self.layers),
                "per_layer_alpha": [list(p) for p in self.per_layer_alpha],
                "allow_other_model": self.allow_other_model}

    def vectors(self) -> dict[str, HarmVector | SafetyVector]:
        return {} if self.vector is None else {vector_digest(self.vector): self.vector}

    def safety_vector(self, model: TransformerBridge) -> SafetyVector:
        """The ICV this intervention injects into ``model`` now: the given vector, or one read from ``model``."""
        if self.vector is not None:
            return self.vector
        return SafetyVector.from_pairs(model, list(self.pairs or ()), positions=self.icv_positions,
                                       method=self.icv_method, layers=self.icv_layers)

    def check(self, model: TransformerBridge) -> None:
        _check_layers_fit(self.layers, model, "SafeAlign layers")
        _check_layers_fit(tuple(k for k, _ in self.per_layer_alpha) or None, model, "SafeAlign per_layer_alpha layers")
        _check_layers_fit(self.icv_layers, model, "SafeAlign icv_layers")
        if self.vector is not None:
            check_vector_fits(self.vector, model)
            if not self.allow_other_model:
                _check_same_model(self.vector.meta.get("model", ""), model)

    @contextlib.contextmanager
    def apply(self, model: TransformerBridge) -> Iterator[TransformerBridge]:
        self.check(model)
        sv = self.safety_vector(model)
        hooks = safety_hooks(sv, self.alpha, self.layers, site=self.site, formula=self.formula,
                             positions=self.positions, per_layer_alpha=dict(self.per_layer_alpha), model=model)
        with model.hooks(fwd_hooks=hooks):
            yield model


def _check_same_model(made_for: str, model: TransformerBridge) -> None:
    # Both sides portable: vectors saved before names were recorded portably still match their model.
    made_for, here = portable_name(made_for) if made_for else "", model_name(model)
    if made_for and here and made_for != here:
        raise InputError(
            f"The vector was read from model {made_for!r}, not {here!r}; read it from this model, or pass "
            "allow_other_model=True to apply it across models on purpose."
        )


@dataclass(frozen=True, eq=False, repr=False)
class DirectionalAblation(Intervention):
    """Directional ablation: x − (x·v̂)v̂ at each chosen layer and site, every position (Arditi et al. 2024).

    Attributes:
        direction: one direction ``Float[Tensor, " d_model"]`` for every layer, a per-layer
            ``Float[Tensor, "n_layers d_model"]``, or a :class:`SafetyVector`; only its orientation matters.
        layers: layers to ablate at; None = all.
        sites: hook sites per layer (``resid_pre``, ``attn_out``, ``mlp_out``, ``resid_post``); the default
            is Arditi et al.'s: every write into the residual stream and the stream itself before each block.
        allow_other_model: as :class:`SafeAlign`'s, for a SafetyVector from another model.

    Raises:
        ValueError: (on construction) a direction that is not 1-D or 2-D, non-finite or all zero, an unknown
            site; (on apply) a width or layer count that does not fit the model.
    """

    direction: Tensor | SafetyVector
    layers: tuple[int, ...] | None = None
    sites: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out")
    allow_other_model: bool = False
    kind: ClassVar[str] = "directional_ablation"

    def __post_init__(self) -> None:
        d = self.direction.directions if isinstance(self.direction, SafetyVector) else self.direction
        if not torch.is_tensor(d) or d.ndim not in (1, 2):
            raise InputError("direction must be a [d_model] or [n_layers, d_model] tensor, or a SafetyVector.")
        if not torch.isfinite(d).all() or not d.abs().sum():
            raise InputError("direction holds NaN/inf or is all zero; it has no orientation to ablate.")
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(dict.fromkeys(self.sites))
        unknown = [s for s in sites if not isinstance(s, str) or s not in SITES]
        if not sites or unknown:
            raise InputError(f"sites must be a non-empty subset of {sorted(SITES)}; got {self.sites!r}.")
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "layers", _layers(self.layers, "DirectionalAblation layers"))
        # One stored form for hashing and saving: a bare tensor travels as a one- or n-row SafetyVector.
        stored = self.direction if isinstance(self.direction, SafetyVector) else SafetyVector(
            d.detach().float().reshape(-1, d.shape[-1]).clone(), {"space": "direction"})
        object.__setattr__(self, "_stored", stored)
        _flag(self.allow_other_model, "allow_other_model")

    @property
    def name(self) -> str:
        where = "" if self.layers is None else f" L{','.join(map(str, self.layers))}"
        return f"directional ablation{where}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "direction": vector_digest(self._stored),
                # A [d] direction serves every layer, a [1, d] one a one-layer model only: the shape is configuration.
                "direction_type": "safety_vector" if isinstance(self.direction, SafetyVector)
                else f"tensor_{self.direction.ndim}d",
                "layers": None if self.layers is None else list(self.layers), "sites": list(self.sites),
                "allow_other_model": self.allow_other_model}

    def vectors(self) -> dict[str, HarmVector | SafetyVector]:
        return {vector_digest(self._stored): self._stored}

    def _per_layer(self, model: TransformerBridge) -> SafetyVector:
        """The direction per layer, from the copy taken on construction (what the fingerprint and save see)."""
        cfg = model.cfg
        if isinstance(self.direction, SafetyVector):
            if not self.allow_other_model:
                _check_same_model(self.direction.meta.get("model", ""), model)
            check_vector_fits(self._stored, model)
            return self._stored
        d = self._stored.directions
        d = d[0] if d.shape[0] == 1 and self.direction.ndim == 1 else d
        if d.shape[-1] != cfg.d_model or (d.ndim == 2 and d.shape[0] != cfg.n_layers):
            raise InputError(f"direction has shape {tuple(d.shape)}; this model needs [{cfg.d_model}] or "
                             f"[{cfg.n_layers}, {cfg.d_model}].")
        rows = d.expand(cfg.n_layers, -1) if d.ndim == 1 else d
        # A bare tensor carries no processing mode: it is taken to be in the model's own.
        return SafetyVector(rows.contiguous(), {"processing": processing_mode(model)})

    def check(self, model: TransformerBridge) -> None:
        _check_layers_fit(self.layers, model, "DirectionalAblation layers")
        self._per_layer(model)

    @contextlib.contextmanager
    def apply(self, model: TransformerBridge) -> Iterator[TransformerBridge]:
        self.check(model)
        sv = self._per_layer(model)
        hooks = [h for site in self.sites
                 for h in safety_hooks(sv, 0.0, self.layers, site=site, formula="ablate", model=model)]
        with model.hooks(fwd_hooks=hooks):
            yield model


@dataclass(frozen=True, eq=False, repr=False)
class HeadAblation(Intervention):
    """Attention heads' outputs (``hook_z``) set to zero or to their mean, at every position.

    Zero-ablation removes what a head writes; mean-ablation keeps its average over ``mean_prompts`` (chat
    template, every position; read from the model as it is when applied) and removes only the
    prompt-specific part (Wang et al. 2022, IOI).

    Attributes:
        heads: ``((layer, head), …)``.
        mode: ``zero`` or ``mean``.
        mean_prompts: user requests the mean is taken over (``mean`` only).

    Raises:
        ValueError: (on construction) no heads, a negative index, an unknown mode, mean without prompts;
            (on apply) a head the model lacks.
    """

    heads: tuple[tuple[int, int], ...]
    mode: Literal["zero", "mean"] = "zero"
    mean_prompts: tuple[str, ...] = ()
    kind: ClassVar[str] = "head_ablation"

    def __post_init__(self) -> None:
        try:
            pairs = [tuple(h) for h in self.heads]
        except TypeError:
            raise InputError(f"heads must be (layer, head) pairs; got {self.heads!r}.") from None
        if any(len(h) != 2 for h in pairs):
            raise InputError(f"heads must be (layer, head) pairs; got {self.heads!r}.")
        heads = tuple(sorted({(_index(layer, "head layers"), _index(head, "heads")) for layer, head in pairs}))
        if not heads or min(min(h) for h in heads) < 0:
            raise InputError(f"heads must be a non-empty list of (layer, head) pairs ≥ 0; got {self.heads!r}.")
        if self.mode not in ("zero", "mean"):
            raise InputError(f"mode must be 'zero' or 'mean'; got {self.mode!r}.")
        if isinstance(self.mean_prompts, str):
            raise InputError("mean_prompts must be a sequence of requests, not one string; wrap it: (text,).")
        prompts = tuple(self.mean_prompts)
        if not all(isinstance(t, str) and t.strip() for t in prompts):
            raise InputError("mean_prompts must be non-empty strings.")
        if self.mode == "mean" and not prompts:
            raise InputError("mode='mean' needs mean_prompts= (requests whose average head output is kept).")
        if self.mode == "zero" and prompts:
            raise InputError("mean_prompts is only used with mode='mean'.")
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "mean_prompts", prompts)

    @property
    def name(self) -> str:
        return f"{self.mode}-ablate {len(self.heads)} head{'s' * (len(self.heads) != 1)}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "heads": [list(h) for h in self.heads], "mode": self.mode,
                "mean_prompts": list(self.mean_prompts)}

    @torch.no_grad()
    def _mean_z(self, model: TransformerBridge) -> Float[Tensor, "n_layers n_heads d_head"]:
        layers = sorted({layer for layer, _ in self.heads})
        sums: dict[int, Tensor] = {}
        count = 0
        for text in format_prompts(model.tokenizer, list(self.mean_prompts)):
            # One text per pass: no padding positions to keep out of the mean.
            ids = tokenize_left_padded(model.tokenizer, [text], add_special_tokens=True, device=model.cfg.device)
            _, cache = model.run_with_cache(ids["input_ids"], names_filter=[f"blocks.{lay}.attn.hook_z" for lay in layers])
            for lay in layers:
                z = cache[f"blocks.{lay}.attn.hook_z"][0].float()  # [pos, n_heads, d_head]
                sums[lay] = sums.get(lay, 0) + z.sum(0)
            count += z.shape[0]
        cfg = model.cfg
        mean = torch.zeros(cfg.n_layers, cfg.n_heads, cfg.d_head)
        for lay, s in sums.items():
            mean[lay] = s.cpu() / count
        return mean

    def check(self, model: TransformerBridge) -> None:
        cfg = model.cfg
        bad = [h for h in self.heads if h[0] >= cfg.n_layers or h[1] >= cfg.n_heads]
        if bad:
            raise InputError(f"heads {bad} are outside the model's {cfg.n_layers} layers × {cfg.n_heads} heads.")

    @contextlib.contextmanager
    def apply(self, model: TransformerBridge) -> Iterator[TransformerBridge]:
        self.check(model)
        mean_z = self._mean_z(model) if self.mode == "mean" else None
        with model.hooks(fwd_hooks=ablate_heads_hooks(list(self.heads), mean_z)):
            yield model


@dataclass(frozen=True, eq=False, repr=False)
class KnowledgeEdit(Intervention):
    """ROME knowledge edits of one layer's MLP output projection, restored bit-exactly on exit (paper §4, EDIT).

    The paper's EDIT scenario edits the target with ROME (Meng et al. 2022, §3) and shows the edit erodes safety;
    ``Compose([KnowledgeEdit(edits, layer=4), HarmRemoval(hv, lam)])`` is HDR on the edited model. Applying runs
    :func:`sa_lens.editing.knowledge_edit`: each request's rank-one update ΔW (``[d_model, d_mlp]``, GPT-2's
    ``Conv1D`` stores it transposed) is computed on the model as the previous ones left it, and the weight is
    written back bit for bit on exit, also after an exception. The update is recomputed at every ``apply``
    (deterministic for fixed options on one model and device; key statistics are cached by
    :mod:`sa_lens.edit_stats`).

    Attributes:
        edits: the requests, applied in order (:class:`~sa_lens.edit_requests.EditRequest`, or rows of either
            form :meth:`EditRequest.from_row` reads, normalised to requests on construction).
        layer: the decoder layer whose MLP output projection is edited.
        options: :class:`~sa_lens.editing.RomeOptions` (steps, lr, KL and weight-decay factors, key-statistics
            corpus, …); every field is part of the fingerprint.

    Raises:
        ValueError: (on construction) no edits, one request not wrapped in a list, a malformed row or request, a
            layer that is not an integer ≥ 0, options that are not RomeOptions; (on check/apply) a layer past the
            model's, an architecture without one locatable MLP output projection (a mixture of experts), a subject
            with no token of its own, ``chat`` without a chat template.
        ConvergenceError: (on apply) an edit whose target NLL stayed above ``options.max_loss``; nothing stays applied.
    """

    edits: tuple[EditRequest, ...]
    layer: int
    options: RomeOptions = RomeOptions()
    kind: ClassVar[str] = "knowledge_edit"

    def __post_init__(self) -> None:
        edits = self.edits
        if not isinstance(edits, (EditRequest, Mapping, str, bytes)):
            edits = list(edits) if isinstance(edits, Iterable) else [edits]
            bad = sorted({type(e).__name__ for e in edits if not isinstance(e, (EditRequest, Mapping))})
            if bad:
                raise InputError(f"KnowledgeEdit edits must be EditRequests or rows (dicts); got {', '.join(bad)}.")
        object.__setattr__(self, "edits", tuple(_requests(edits)))
        layer = _index(self.layer, "KnowledgeEdit layer")
        if layer < 0:
            raise InputError(f"KnowledgeEdit layer must be a decoder layer index ≥ 0; got {layer}.")
        object.__setattr__(self, "layer", layer)
        if not isinstance(self.options, RomeOptions):
            raise InputError(f"KnowledgeEdit options must be RomeOptions, got {type(self.options).__name__}.")

    @property
    def name(self) -> str:
        return f"ROME L{self.layer} ×{len(self.edits)}"

    def to_dict(self) -> dict:
        # Through JSON once so tuples are lists: the dict equals what from_dict reads back.
        return {"kind": self.kind, "edits": json.loads(json.dumps([asdict(r) for r in self.edits])),
                "layer": self.layer, "options": json.loads(json.dumps(asdict(self.options)))}

    def check(self, model: TransformerBridge) -> None:
        _, tokenizer = _hf_and_tokenizer(model, None)
        site = mlp_output(model, self.layer)
        if self.options.chat and not getattr(tokenizer, "chat_template", None):
            raise InputError("KnowledgeEdit with RomeOptions(chat=True) needs a tokenizer with a chat template.")
        for request in self.edits:  # every request's tokens (subject position, target), nothing optimised
            _batch(tokenizer, request, self.options, site.weight.device)

    @contextlib.contextmanager
    def apply(self, model: TransformerBridge) -> Iterator[TransformerBridge]:
        with knowledge_edit(model, self.edits, self.layer, self.options):
            yield model


@dataclass(frozen=True, eq=False, repr=False)
class Compose(Intervention):
    """Several interventions applied in order and undone in reverse; ``Compose([])`` is the original model.

    ``Compose([HarmRemoval(hv, λ), SafeAlign(pairs=p, alpha=α)])`` is the paper's Safety Arithmetic: the ICV
    is read inside the HDR block, from θ̂ (paper §3.3).

    Attributes:
        steps: the interventions, outermost first.
        label: the name to show (default: the steps' names joined by " + ", or "Original" when empty).

    Raises:
        ValueError: a step that is not an intervention.
    """

    steps: tuple[Intervention, ...] = ()
    label: str | None = None
    kind: ClassVar[str] = "compose"

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        bad = [type(s).__name__ for s in steps if not isinstance(s, Intervention)]
        if bad:
            raise InputError(f"Compose takes interventions (HarmRemoval, SafeAlign, …); got {', '.join(bad)}.")
        object.__setattr__(self, "steps", steps)

    @property
    def name(self) -> str:
        return self.label or (" + ".join(s.name for s in self.steps) if self.steps else "Original")

    def to_dict(self) -> dict:
        # The label is presentation, not configuration: two labels on one config share records.
        return {"kind": self.kind, "steps": [s.to_dict() for s in self.steps]}

    def vectors(self) -> dict[str, HarmVector | SafetyVector]:
        return {k: v for s in self.steps for k, v in s.vectors().items()}

    def check(self, model: TransformerBridge) -> None:
        for step in self.steps:
            step.check(model)

    @contextlib.contextmanager
    def apply(self, model: TransformerBridge) -> Iterator[TransformerBridge]:
        with contextlib.ExitStack() as stack:
            for step in self.steps:
                stack.enter_context(step.apply(model))
            yield model


INTERVENTIONS: dict[str, type] = {
    cls.kind: cls for cls in (HarmRemoval, SafeAlign, DirectionalAblation, HeadAblation, KnowledgeEdit, Compose)
}
"""Registry: the ``kind`` written by ``to_dict`` → the class :func:`from_dict` rebuilds."""


# ---- JSON and files ----------------------------------------------------------------------------------------


_MAX_DEPTH = 32  # Compose nesting a config may hold; deeper is a malformed (or hostile) file, not a state


def from_dict(d: Mapping, vectors: Mapping[str, HarmVector | SafetyVector] | None = None) -> Intervention:
    """Rebuild an intervention from :meth:`to_dict` output; vectors are looked up by their digest.

    Args:
        d: the dict (``kind`` names the class, see :data:`INTERVENTIONS`).
        vectors: digest → vector, e.g. ``original.vectors()`` or what :func:`load` read from files.

    Raises:
        ValueError: an unknown kind, a missing field or one of the wrong type, a missing or altered vector, or
            a value the class refuses — always an :class:`~sa_lens.errors.InputError` naming the problem.
    """
    return _from_dict(d, dict(vectors or {}), 0)


def _from_dict(d: Any, vectors: dict, depth: int) -> Intervention:
    if not isinstance(d, Mapping):
        raise InputError(f"an intervention config is a JSON object with a 'kind'; got {type(d).__name__}.")
    kind = d.get("kind")
    if not isinstance(kind, str) or kind not in INTERVENTIONS:
        raise InputError(f"unknown intervention kind {kind!r}; known: {', '.join(INTERVENTIONS)}.")
    if depth > _MAX_DEPTH:
        raise InputError(f"Compose configs nest deeper than {_MAX_DEPTH} levels; the file is malformed.")

    def vec(digest: Any) -> HarmVector | SafetyVector:
        if not isinstance(digest, str) or digest not in vectors:
            raise InputError(f"the {kind} config needs vector {digest!r}, which was not given; pass vectors= or use "
                             "sa_lens.interventions.load on a file written by save.")
        v = vectors[digest]
        now = vector_digest(v, fresh=True)
        if now != digest:
            raise InputError(f"vector {digest} has other contents now (digest {now}).")
        return v

    def seq(key: str, default: Any = ()) -> tuple:
        value = d.get(key, default)
        if value is None:
            return None  # type: ignore[return-value]
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            raise InputError(f"{kind} config: '{key}' must be a list; got {value!r}.")
        return tuple(tuple(x) if isinstance(x, list) else x for x in value)

    try:
        layers = seq("layers", None)
        if kind == "compose":
            steps = seq("steps")
            return Compose(tuple(_from_dict(step, vectors, depth + 1) for step in steps))
        if kind == "harm_removal":
            return HarmRemoval(vec(d["harm_vector"]), d["lam"], layers)
        if kind == "safe_align":
            common = dict(alpha=d["alpha"], site=d["site"], formula=d["formula"], positions=d["positions"],
                          layers=layers, per_layer_alpha=seq("per_layer_alpha"),
                          allow_other_model=d.get("allow_other_model", False))
            if "vector" in d:
                return SafeAlign(vector=vec(d["vector"]), **common)
            return SafeAlign(pairs=seq("pairs"), icv_positions=d["icv_positions"], icv_method=d["icv_method"],
                             icv_layers=seq("icv_layers", None), **common)
        if kind == "directional_ablation":
            v = vec(d["direction"])
            kind_of = d.get("direction_type")
            direction = v if kind_of == "safety_vector" else v.directions[0] if kind_of == "tensor_1d" else v.directions
            return DirectionalAblation(direction, layers, seq("sites"), d.get("allow_other_model", False))
        if kind == "knowledge_edit":
            options = d["options"]
            if not isinstance(options, Mapping):
                raise TypeError(f"'options' must be an object; got {options!r}")
            rows = seq("edits")
            if not all(isinstance(r, Mapping) for r in rows):
                raise TypeError("each of 'edits' must be an object of EditRequest fields")
            return KnowledgeEdit(tuple(EditRequest(**r) for r in rows), d["layer"], RomeOptions(**options))
        return HeadAblation(seq("heads"), d["mode"], seq("mean_prompts"))
    except KeyError as e:
        raise InputError(f"{kind} config lacks the field {e.args[0]!r}; write configs with to_dict or save.") from None
    except (TypeError, AttributeError) as e:
        raise InputError(f"{kind} config has a field of the wrong type ({e}); write configs with to_dict or save.") from None


def save(intervention: Intervention, path: str | os.PathLike) -> Path:
    """Write the config as JSON at ``path`` and each vector beside it (``<stem>.<digest>.safetensors``).

    Returns:
        The JSON path. :func:`load` on it rebuilds an equal intervention (same fingerprint) in any process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files = {}
    for digest, v in intervention.vectors().items():
        if vector_digest(v, fresh=True) != digest:  # edited in place after it was first hashed: the config no longer says it
            raise InputError(f"vector {digest} was changed in place after the intervention used it; build a new "
                             "intervention from the changed vector.")
        file = path.with_name(f"{path.stem}.{digest}.safetensors")
        v.save(file)
        files[digest] = {"file": file.name, "type": "harm_vector" if isinstance(v, HarmVector) else "safety_vector"}
    doc = {"format": FORMAT, "name": intervention.name, "fingerprint": intervention.fingerprint(),
           "config": intervention.to_dict(), "vectors": files}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def load(path: str | os.PathLike) -> Intervention:
    """Read a config written by :func:`save`, with its vectors (safetensors, never pickles).

    Raises:
        FileNotFoundError: no such file, or a vector file named in it is missing.
        ValueError: not an sa_lens intervention file (or not JSON), a vector entry that is malformed or points
            outside the file's folder, a vector whose contents changed, or a config that was edited.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not JSON ({e}); write intervention files with sa_lens.interventions.save.") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "config" not in doc:
        raise InputError(f"{path} is not an sa_lens intervention file (format {FORMAT}); write one with "
                         "sa_lens.interventions.save.")
    entries = doc.get("vectors", {})
    if not isinstance(entries, dict):
        raise InputError(f"{path}: 'vectors' must map digests to files.")
    vectors: dict[str, HarmVector | SafetyVector] = {}
    for digest, entry in entries.items():
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or Path(name).name != name or entry.get("type") not in ("harm_vector", "safety_vector"):
            raise InputError(f"{path}: vector entry {digest!r} must name a file beside it and its type; got {entry!r}.")
        cls = HarmVector if entry["type"] == "harm_vector" else SafetyVector
        vectors[digest] = cls.load(path.with_name(name))
    out = from_dict(doc["config"], vectors)
    if out.fingerprint() != doc.get("fingerprint"):
        raise InputError(f"{path}: the rebuilt config's fingerprint differs from the one saved; the file was edited.")
    return out
