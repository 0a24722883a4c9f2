"""A safety vector as a llama.cpp control vector (GGUF), and the reader that checks such a file.

llama.cpp steers with ``--control-vector file.gguf`` (``--control-vector-scaled file.gguf:S``,
``--control-vector-layer-range A B``): one fixed vector per layer, added to the residual stream at the output of
the decoder block, at every position. What it reads (llama.cpp ``common/common.cpp``
``common_control_vector_load_one``, ``src/llama-adapter.cpp`` ``llama_adapter_cvec::apply`` / ``apply_to``,
called as ``build_cvec(cur, il)`` after each block's last residual add in the model graphs, ``src/models/``):

- GGUF architecture ``controlvector``; ``controlvector.model_hint`` (string) and ``controlvector.layer_count``
  (uint32) are written by the producers (repeng's ``ControlVector.export_gguf``, llama.cpp's
  ``cvector-generator``) and not read by llama.cpp;
- one float32 tensor ``direction.N`` of shape ``[n_embd]`` per steered block, added (times the strength of
  ``--control-vector-scaled``) to the output of block N, counted from 0. N ≥ 1: ``direction.0`` is rejected as
  invalid, so the output of block 0 and the embeddings cannot be steered.

Only a Safe-Align configuration that adds one fixed vector per layer to the residual stream at every position
has such a file: ``formula="add"`` (x − α·v, :func:`sa_lens.steering.add_step`) at ``resid_post``,
``resid_pre``, or ``mlp_out`` of an architecture that adds its MLP output to the residual stream unchanged. The
vector points from safe toward unsafe and ``add`` subtracts it, so ``direction.N = −α_l · v[l]``.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from sa_lens.errors import InputError
from sa_lens.safety_vector import SafetyVector
from sa_lens.steering import check_steering_options

__all__ = ["ADDITIVE_MLP_OUT", "ARCHITECTURE", "POST_NORM_MLP_OUT", "control_vectors", "from_gguf", "to_gguf"]

ARCHITECTURE = "controlvector"
# Hugging Face model types whose decoder block adds the MLP module's output to the residual stream as it is
# (pre-norm, sequential or parallel residual), so x − α·v at ``mlp_out`` of layer l is x − α·v at the block's
# output. Granite and MiniCPM scale the MLP output before the add and are not listed.
ADDITIVE_MLP_OUT = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma", "gpt2", "gptj",
    "gpt_neox", "stablelm", "starcoder2",
})
# Model types that normalise the MLP output before adding it (``hook_mlp_out`` reads it before that norm).
POST_NORM_MLP_OUT = {
    "gemma2": "post_feedforward_layernorm", "gemma3": "post_feedforward_layernorm",
    "gemma3_text": "post_feedforward_layernorm", "gemma3n": "post_feedforward_layernorm",
    "olmo2": "post_feedforward_layernorm",
}
_BLOCK_OFFSET = {"resid_post": 0, "mlp_out": 0, "resid_pre": -1}  # llama.cpp block N = sa_lens layer l + offset
_DIRECTION = re.compile(r"direction\.(\d+)")


def control_vectors(
    sv: SafetyVector,
    alpha: float,
    *,
    site: str,
    formula: str,
    positions: str = "all",
    layers: Sequence[int] | None = None,
    per_layer_alpha: Mapping[int, float] | None = None,
    model_type: str | None = None,
    assume_additive_mlp: bool = False,
) -> dict[int, Float[Tensor, " d_model"]]:
    """The vectors llama.cpp must add to reproduce ``SafeAlign(vector=sv, formula="add", ...)``, by block.

    Args:
        sv: the safety vector ``[n_layers, d_model]``, pointing from safe toward unsafe (activation units).
        alpha: α of ``formula="add"``, in activation units (not the official formula's α: choose it for ``add``).
        site: ``resid_post`` (layer l → block l), ``resid_pre`` (layer l → block l − 1: the input of block l is
            the output of block l − 1) or ``mlp_out`` (layer l → block l; ``model_type`` must be known).
        formula: ``add`` only; ``official`` and ``ablate`` depend on the activation and are refused.
        positions: ``all`` only (llama.cpp steers prompt and generated tokens alike).
        layers: sa_lens layers to export (as :func:`sa_lens.safety_hooks`); all by default.
        per_layer_alpha: ``{layer: α}`` overriding ``alpha`` for some of the exported layers (int keys).
        model_type: the model's Hugging Face ``config.model_type`` (``llama``, ``qwen2``…); needed for
            ``mlp_out``, which is additive only where the block adds the MLP output unchanged.
        assume_additive_mlp: export ``mlp_out`` for a model type not in :data:`ADDITIVE_MLP_OUT`, on the
            caller's word that its block adds the MLP output to the residual stream as it is.

    Returns:
        ``{N: w}`` with N ≥ 1 the llama.cpp block index and ``w = −α_l · v[l]`` (fp32, ``[d_model]``), sorted by
        N. Rows that are all zero (layers the vector was not extracted over, or α_l = 0) are left out: they add
        nothing.

    Raises:
        InputError: a formula, site or position policy llama.cpp cannot reproduce (the message says why and
            what to use), a vector read from folded / centred weights, an unknown or post-norm architecture
            for ``mlp_out``, a layer outside the vector or not an integer, a ``per_layer_alpha`` key for a layer
            not exported, a non-zero row that would land on block 0 or the embeddings, an α·v that overflows
            float32, or nothing left to export.
    """
    per_layer_alpha = dict(per_layer_alpha or {})
    check_steering_options(alpha, site, formula, positions, per_layer_alpha)
    _check_expressible(site, formula, positions, model_type, assume_additive_mlp)
    if sv.meta.get("processing", "raw") != "raw":
        raise InputError(
            "The safety vector was read from a model whose weights enable_compatibility_mode() folded and centred; "
            "llama.cpp runs the checkpoint's own weights, whose residual stream is in other coordinates. "
            "Extract the vector from the model as loaded (sa_lens.load_model without compatibility mode)."
        )
    for what, indices in (("layers", [] if layers is None else list(layers)), ("per_layer_alpha keys", per_layer_alpha)):
        not_int = [i for i in indices if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
        if not_int:
            raise InputError(f"{what} must be integer layer indices (0..{sv.n_layers - 1}); got {not_int!r}.")
    chosen = list(range(sv.n_layers)) if layers is None else sorted({int(i) for i in layers})
    bad = [layer for layer in [*chosen, *per_layer_alpha] if not 0 <= layer < sv.n_layers]
    if bad:
        raise InputError(f"Layer indices {bad} are outside the safety vector's {sv.n_layers} layers.")
    unused = sorted(int(k) for k in per_layer_alpha if int(k) not in chosen)
    if unused:
        # A silently ignored α would export a configuration other than the one the caller evaluated.
        raise InputError(f"per_layer_alpha names layers {unused} that are not exported (layers {chosen}); add them "
                         "to layers or drop them from per_layer_alpha.")
    per_layer_alpha = {int(k): v for k, v in per_layer_alpha.items()}
    vectors: dict[int, Tensor] = {}
    for layer in chosen:
        a = float(per_layer_alpha.get(layer, alpha))
        w = -a * sv.directions[layer].float()
        if not w.any():
            continue
        if not torch.isfinite(w).all():
            raise InputError(
                f"Layer {layer}: α·v = {a:g}·v overflows float32 (max |v| = {float(sv.directions[layer].abs().max()):g}), "
                "so the file would hold ±inf. Choose a smaller α for it (α·max|v| below ~3.4e38; useful α are "
                "far smaller, of the order of the activations' norm)."
            )
        block = layer + _BLOCK_OFFSET[site]
        if block < 1:
            first = 1 - _BLOCK_OFFSET[site]
            what = "the embeddings" if block < 0 else "the output of block 0"
            raise InputError(
                f"Layer {layer} at {site} is {what}, which llama.cpp cannot steer (it rejects direction.0 and never "
                f"adds to the embeddings), and its row is not zero. Export layers {first}..{sv.n_layers - 1} "
                f"(layers=range({first}, {sv.n_layers}); CLI --layers {first}-{sv.n_layers - 1}), or give layer "
                f"{layer} α = 0 in per_layer_alpha."
            )
        vectors[block] = w.contiguous()
    if not vectors:
        raise InputError("Nothing to export: every chosen row of the safety vector is zero (or its α is 0).")
    return vectors


def to_gguf(
    sv: SafetyVector, path: str | os.PathLike, alpha: float, *, site: str, formula: str, overwrite: bool = False,
    **options,
) -> Path:
    """Write ``sv`` as a llama.cpp control vector: ``llama-cli -m model.gguf --control-vector <path>``.

    Each ``direction.N`` is :func:`control_vectors`'s ``w`` (α and sign applied, fp32), so strength 1
    (``--control-vector``) reproduces ``SafeAlign(vector=sv, alpha=alpha, formula="add", site=site, ...)``;
    ``--control-vector-scaled <path>:S`` multiplies α by S. Provenance goes in ``sa_lens.*`` string keys
    (llama.cpp ignores unknown keys): version, source model, site, formula, positions, α, per-layer α, the
    block → layer map, the sign, and the vector's own metadata as JSON.

    Arguments (``options``: positions, layers, per_layer_alpha, model_type, assume_additive_mlp) and errors are
    :func:`control_vectors`'s; ``overwrite=True`` replaces an existing file at ``path``. Everything is checked
    before the file is written, and it is written to a temporary file first, so a refusal or a failed write
    leaves no partial ``path``.

    Returns:
        ``path`` as a Path.

    Raises:
        InputError: :func:`control_vectors`'s refusals; ``path`` is a folder, or an existing file and
            ``overwrite`` is False.
    """
    from sa_lens import __version__

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give the control vector a file path such as {path / 'sv.gguf'}.")
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it, or choose another path.")
    vectors = control_vectors(sv, alpha, site=site, formula=formula, **options)
    per_layer_alpha = options.get("per_layer_alpha") or {}
    provenance = {
        "version": __version__,
        "source_model": str(sv.meta.get("model", "")),
        "site": site,
        "formula": formula,
        "positions": options.get("positions", "all"),
        "alpha": repr(float(alpha)),
        "per_layer_alpha": json.dumps({str(k): float(v) for k, v in sorted(per_layer_alpha.items())}),
        "source_layers": json.dumps({str(block): block - _BLOCK_OFFSET[site] for block in vectors}),
        "sign": "direction.N = -alpha_l * v[l], v pointing from safe toward unsafe (SafeAlign formula 'add')",
        "vector_meta": json.dumps(sv.meta, default=str, sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        _write(partial, vectors, options.get("model_type") or "unknown", provenance)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def from_gguf(path: str | os.PathLike) -> dict[int, Float[Tensor, " n_embd"]]:
    """Read a control vector file: ``{N: vector}``, the vector llama.cpp adds to the output of block N.

    Checks what ``common_control_vector_load_one`` checks (llama.cpp ``common/common.cpp``): architecture
    ``controlvector``, only ``direction.N`` tensors with N ≥ 1, each float32, 1-D, of one width; and at least one
    of them, each block once (llama.cpp reads ``direction.01`` and ``direction.1`` both as block 1 and adds
    them, which no writer means).

    Raises:
        FileNotFoundError: no such file.
        InputError: not a readable GGUF file (truncated, or another format), another architecture, no
            direction tensors, two tensors for one block, or a tensor llama.cpp would reject (named).
    """
    import gguf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such control vector file.")
    with _unreadable_as_input_error(path):
        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        arch = field.contents() if field is not None else None
    if arch != ARCHITECTURE:
        raise InputError(f"{path}: GGUF architecture is {arch!r}, not {ARCHITECTURE!r}; it is not a control vector.")
    vectors: dict[int, Tensor] = {}
    names: dict[int, str] = {}
    for t in reader.tensors:
        name, tensor_type, shape = t.name, t.tensor_type, t.shape
        match = _DIRECTION.fullmatch(name)
        if match is None or int(match.group(1)) == 0:
            raise InputError(f"{path}: tensor {name!r} is not direction.N with N ≥ 1; llama.cpp rejects the file.")
        if tensor_type != gguf.GGMLQuantizationType.F32 or len(shape) != 1:
            raise InputError(f"{path}: {name} must be a 1-D float32 tensor; llama.cpp rejects the file.")
        block = int(match.group(1))
        if block in names:
            raise InputError(f"{path}: tensors {names[block]!r} and {name!r} both name block {block}; llama.cpp would "
                             "add both there. Keep one tensor per block.")
        names[block] = name
        with _unreadable_as_input_error(path):  # data is read here, lazily: only a control vector's is copied
            vectors[block] = torch.from_numpy(t.data.copy())
    if not vectors:
        raise InputError(f"{path}: no direction.N tensors; llama.cpp fails to load a control vector without any. "
                         "Export at least one non-zero layer.")
    if len({v.shape[0] for v in vectors.values()}) > 1:
        raise InputError(f"{path}: direction tensors of different widths; llama.cpp rejects the file.")
    return dict(sorted(vectors.items()))


@contextlib.contextmanager
def _unreadable_as_input_error(path: Path) -> Iterator[None]:
    """Turn the gguf reader's failures on a damaged file (IndexError, ValueError, struct errors…) into InputError."""
    try:
        yield
    except (InputError, OSError):  # an OSError (permissions, a folder) names the file and says what is wrong
        raise
    except Exception as exc:
        raise InputError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}); it is truncated or not "
                         "GGUF. Export it again (sa-lens export-vector).") from exc


def _write(path: Path, vectors: Mapping[int, Tensor], model_hint: str, provenance: Mapping[str, str]) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), ARCHITECTURE)
    try:
        writer.add_string(f"{ARCHITECTURE}.model_hint", model_hint)
        writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(vectors))  # the tensors, as repeng and cvector-generator
        for key, value in provenance.items():
            writer.add_string(f"sa_lens.{key}", value)
        for block, w in vectors.items():
            writer.add_tensor(f"direction.{block}", w.numpy().astype("float32"))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _check_expressible(site: str, formula: str, positions: str, model_type: str | None, assume_additive_mlp: bool) -> None:
    """Raise InputError unless (site, formula, positions) is one fixed vector added at a block's output."""
    if formula == "official":
        raise InputError(
            "formula='official' cannot be a llama.cpp control vector: it rotates each token's MLP output m away "
            "from v by c = 0.1·α·(1 + relu(cos(m, v))) and keeps ‖m‖, so what it changes depends on m, while "
            "llama.cpp adds one fixed vector per layer. Export formula='add' (x − α·v, α in activation units) and "
            "choose its α for 'add' (evaluate SafeAlign(formula='add', ...) in sa_lens first): the official α is "
            "on another scale."
        )
    if formula == "ablate":
        raise InputError(
            "formula='ablate' cannot be a llama.cpp control vector: x − (x·v̂)v̂ removes a different amount from "
            "every activation, while llama.cpp adds one fixed vector per layer. Export formula='add', or keep "
            "ablation in sa_lens (DirectionalAblation)."
        )
    if positions != "all":
        raise InputError(
            f"positions={positions!r} cannot be a llama.cpp control vector: llama.cpp adds it at every position, "
            "prompt and generated tokens alike. Export positions='all'."
        )
    if site == "attn_out":
        raise InputError(
            "site='attn_out' cannot be a llama.cpp control vector: the attention output of layer l is added before "
            "the same block's MLP reads the residual stream, and llama.cpp adds only at block outputs. Export "
            "site='resid_post' (block l's output) or 'resid_pre' (block l − 1's output)."
        )
    if site != "mlp_out":
        return
    if model_type is None and not assume_additive_mlp:
        raise InputError(
            "site='mlp_out' is a llama.cpp control vector only where the block adds its MLP output to the residual "
            "stream unchanged, and the safety vector does not record the architecture. Pass model_type= (the "
            "model's config.model_type, e.g. 'llama'), or export site='resid_post', which needs no architecture."
        )
    if model_type in POST_NORM_MLP_OUT:
        raise InputError(
            f"site='mlp_out' on {model_type!r}: its {POST_NORM_MLP_OUT[model_type]} normalises the MLP output before "
            "it is added, so x − α·v there is not x − α·v on the residual stream and no control vector reproduces "
            "it. Export site='resid_post' (and evaluate that configuration in sa_lens)."
        )
    if model_type not in ADDITIVE_MLP_OUT and not assume_additive_mlp:
        raise InputError(
            f"site='mlp_out' on model type {model_type!r}: sa_lens does not know whether its block adds the MLP "
            f"output to the residual stream unchanged (known: {', '.join(sorted(ADDITIVE_MLP_OUT))}). Pass "
            "assume_additive_mlp=True if it does, or export site='resid_post'."
        )
