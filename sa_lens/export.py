"""Write θ̂ = θt − λ·τH′ as a Hugging Face folder that ``from_pretrained`` loads (paper §3.1, eq. 3).

From a checkpoint folder the edit streams tensor by tensor (one tensor in memory), so a 70B target never has to
fit in memory; :mod:`sa_lens.streamed_export` does the same from the three folders θb, θH and θt without holding
τH′ either. From an in-memory model or bridge it edits inside :func:`~sa_lens.harm_removal.harm_removal`, saves
each checkpoint tensor once under its checkpoint name (a bridge's aliases and its own buffers left out) and
restores the caller's weights bit-exactly.

A folder export writes what users' tools expect (transformers, mergekit, vLLM): shards planned as mergekit cuts
them (:class:`ShardWriter`: ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` and
``model.safetensors.index.json`` with ``metadata.total_size`` and ``weight_map``), ``config.json`` with the
weights' dtype, the target's tokenizer and other files, a tied ``lm_head`` once (as the embedding it is tied
to), and a provenance card ``README.md`` (:func:`finish_folder`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.utils.hub import convert_file_size_to_int

from sa_lens.bridge import checkpoint_tokenizer, is_bridge
from sa_lens.checkpoints import INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE, Checkpoint, TensorSpec, read_header
from sa_lens.defaults import DEFAULT_LAM
from sa_lens.errors import InputError
from sa_lens.harm_removal import apply_harm_removal, check_lam, harm_removal
from sa_lens.harm_vector import HarmVector, ModelLike, architecture_state_names, checkpoint_parameters
from sa_lens.parameter_names import checkpoint_name
from sa_lens.provenance import portable_name

DEFAULT_MAX_SHARD_SIZE = "5GB"
"""Shard size of a folder export: transformers' and mergekit's default (5·10⁹ bytes)."""

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "ShardWriter", "export_harm_removed", "harm_vector_digest", "save_checkpoint"]


def export_harm_removed(
    target: ModelLike | str | os.PathLike,
    hv: HarmVector,
    out_dir: str | os.PathLike,
    lam: float = DEFAULT_LAM,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Save the harm-removed target θ̂ = θt − λ·τH′ (fp32 arithmetic, cast to each weight's dtype).

    Args:
        target: θt as a local checkpoint folder of safetensors (edited tensor by tensor, written as the module
            docstring says: re-sharded, config dtype, card; a stored tied ``lm_head`` left out), or an HF model /
            bridge (edited in place for the save, then restored; a tied ``lm_head`` is written once, as
            the embedding, and re-tied by ``from_pretrained``). GPT-2's and Phi-3's fused q/k/v are
            written as the checkpoint fuses them.
        hv: the (trimmed) harm vector; dense or sparse entries.
        out_dir: the folder to write; created; must not be the target folder nor already hold weights.
        lam: λ (paper default 3 with top-10 % HDR†; paper-notes.md §2.5).
        tokenizer: written beside the weights for an in-memory target. Default for a bridge loaded by
            :func:`sa_lens.load_model`: the checkpoint's own tokenizer (not TransformerLens's copy, which adds a
            BOS the checkpoint may not); a plain HF model needs it passed (without it the folder has no
            tokenizer, and ``load_model`` refuses it). A folder target's tokenizer files are copied.
        progress: a tqdm bar over the tensors.
        max_shard_size: a folder target's output shards, in bytes or as ``"5GB"`` / ``"2GiB"``; a larger
            tensor gets a shard of its own. (An in-memory model is saved by ``save_pretrained``, with its default.)

    Returns:
        ``out_dir``, loadable with ``AutoModelForCausalLM.from_pretrained`` / ``sa_lens.load_model``.

    Raises:
        ValueError: λ not finite; names/shapes of ``hv`` that the target lacks; writing onto the target or
            into a folder holding weights; an unreadable ``max_shard_size``;
            the folder errors of :class:`~sa_lens.checkpoints.Checkpoint`; a state dict (it has no
            ``save_pretrained``: apply :func:`apply_harm_removal` and save it yourself).
    """
    check_lam(lam)
    out = Path(out_dir)
    if isinstance(target, (str, os.PathLike)):
        return _export_folder(Path(target), hv, out, lam, progress, max_shard_size)
    model = target.original_model if is_bridge(target) else target
    if not hasattr(model, "save_pretrained"):
        raise InputError("export_harm_removed needs a checkpoint folder or a model with save_pretrained; got a state dict.")
    with harm_removal(target, hv, lam):
        return save_checkpoint(target, out, tokenizer)


def save_checkpoint(model: nn.Module, out_dir: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """Save a bridge's or HF model's weights as they are now as a ``from_pretrained`` folder, each tensor once under
    its checkpoint name (:func:`_checkpoint_state_dict`), with ``tokenizer`` (default for a bridge loaded by
    :func:`sa_lens.load_model`: the checkpoint's own).

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    hf = model.original_model if is_bridge(model) else model
    hf.save_pretrained(out, state_dict=_checkpoint_state_dict(hf))
    tokenizer = tokenizer or (checkpoint_tokenizer(model) if is_bridge(model) else None)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _checkpoint_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Each tensor of the checkpoint once, under its checkpoint name: parameters, then persistent buffers.

    A bridge mounts its components inside the HF module tree, so ``state_dict()`` lists every weight under
    several aliases (``attn.q``, ``self_attn.q``, ``…._original_component.q_proj``), which
    ``save_pretrained`` refuses as shared tensors, and adds buffers of its own (an unembedding bias on
    ``lm_head``). ``named_parameters`` sees each tensor once, by its first path — the HF one — and a tied
    ``lm_head`` not at all, which ``from_pretrained`` re-ties from the config as for any tied checkpoint;
    buffers are kept only where the architecture itself has them (its state dict built on the meta device).
    """
    own = architecture_state_names(model) or frozenset()
    state = dict(checkpoint_parameters(model))
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            key = checkpoint_name(f"{prefix}.{name}" if prefix else name)
            if key in own and key not in state:
                state[key] = buf
    return state


def _export_folder(src: Path, hv: HarmVector, out: Path, lam: float, progress: bool, max_shard_size: int | str) -> Path:
    check_out_dir(out, [src])
    ckpt = Checkpoint(src)
    missing = sorted(n for n in hv.deltas if n not in ckpt.specs or ckpt.specs[n].shape != tuple(hv.deltas[n].shape))
    if missing:
        raise InputError(
            f"The harm vector has {len(missing)} parameter(s) the target lacks or shapes otherwise (e.g. "
            f"{missing[:3]}); build τH "
            "from checkpoints of the target's architecture, or load it with restrict=True."
        )
    layout = checkpoint_layout(ckpt)
    with ShardWriter(out, layout, max_shard_size) as writer:
        for name in tqdm(layout, desc="θt − λ·τH′", unit="tensor", disable=not progress):
            tensor = read_tensor(layout[name], name)
            if name in hv.deltas:  # one tensor at a time: apply_harm_removal's fp32 arithmetic and overflow check
                apply_harm_removal({name: tensor}, HarmVector({name: hv.deltas[name]}), lam)
            writer.write(name, [tensor.reshape(-1)])
            del tensor
    card = {
        "target": portable_name(src),
        "base": _portable_or_none(hv.meta.get("base")),
        "harmful": _portable_or_none(hv.meta.get("harmful")),
        "lam": float(lam),
        "top_k": hv.meta.get("top_k"),
        "scope": hv.meta.get("scope"),
        "count": hv.meta.get("count", "official") if hv.meta.get("top_k") is not None else None,
        "harm_vector_sha256": harm_vector_digest(hv),
        "edited_entries": hv.nnz,
    }
    finish_folder(src, out, layout, card)
    return out


# ---- the folder an export writes: shards, index, config, card, tokenizer -----------------------------------


_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_DTYPE_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in _DTYPE_CODES.items()}


def check_out_dir(out: Path, sources: list[Path]) -> None:
    """Refuse an output folder that is one of the source folders or already holds weights.

    Raises:
        ValueError: ``out`` is a source folder, or holds ``.safetensors`` files or a weight index (a previous
            export's shards would mix with this one's).
    """
    for src in sources:
        root = src if src.is_dir() else src.parent
        if out.resolve() == root.resolve():
            raise InputError(f"{out}: export into a new folder, not onto a source checkpoint ({src}).")
    if out.is_dir():
        stale = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))
        if stale:
            raise InputError(f"{out}: already holds weights ({stale[0]}); export into a new or empty folder.")


def checkpoint_layout(ckpt: Checkpoint) -> dict[str, TensorSpec]:
    """Every tensor an export writes, in the checkpoint's file order: its floating-point tensors (``ckpt.specs``)
    and its integer/bool buffers, each once; a tied output embedding that ``ckpt`` drops (``tie_word_embeddings``)
    is left out, since ``from_pretrained`` re-ties it to the (edited) input embedding."""
    layout: dict[str, TensorSpec] = {}
    for file in ckpt.files:
        for name, spec in read_header(file).items():
            if name not in layout and (name in ckpt.specs or not spec.is_float):
                layout[name] = spec
    return layout


def read_tensor(spec: TensorSpec, name: str) -> Tensor:
    """One tensor of any dtype, read whole from its shard (the handle closed after the read).

    Raises:
        ValueError: the shard cannot be read (truncated or corrupted).
    """
    try:
        with safe_open(str(spec.file), "pt") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{spec.file}: cannot read '{name}' ({exc}); the file is truncated or corrupted.") from exc


class ShardWriter:
    """Write a planned set of tensors as safetensors shards, each tensor piece by piece, in any order.

    The shards are planned up front from the tensors' dtypes and shapes, as mergekit's writer cuts them (a new
    shard when the next tensor would take the current one past ``max_shard_size``; a larger tensor alone), so
    each header and offset is known before any data: a tensor is written where it belongs whatever order the
    tensors come in, and no shard is ever held in memory. Names follow transformers and mergekit: one shard is
    ``model.safetensors``; N shards are ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``
    (``metadata.total_size``: bytes of tensor data; ``weight_map``).

    Args:
        out: the folder (created).
        layout: ``{name: TensorSpec}`` in the order the shards should hold them (dtype and shape are used).
        max_shard_size: bytes, or a string as transformers takes it (``"5GB"`` = 5·10⁹, ``"2GiB"`` = 2·2³⁰).

    Raises:
        ValueError: a size string transformers cannot read, or a non-positive size.
    """

    def __init__(self, out: Path, layout: dict[str, TensorSpec], max_shard_size: int | str) -> None:
        limit = _shard_size(max_shard_size)
        self.out = out
        self.layout = layout
        shards: list[list[str]] = []
        size = 0
        for name, spec in layout.items():
            nbytes = _nbytes(spec)
            if not shards or (shards[-1] and size + nbytes > limit):
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        count = len(shards)
        self.files = [SINGLE_FILE] if count <= 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.where: dict[str, tuple[int, int, int]] = {}  # name → (shard, absolute start, bytes)
        self.total_size = sum(_nbytes(spec) for spec in layout.values())
        out.mkdir(parents=True, exist_ok=True)
        self._handles = []
        for i, names in enumerate(shards or [[]]):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name in names:
                spec, nbytes = layout[name], _nbytes(layout[name])
                header[name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
            handle = open(out / self.files[i], "wb")  # noqa: SIM115 (closed in close())
            handle.write(struct.pack("<Q", len(text)) + text)
            handle.truncate(8 + len(text) + offset)
            self._handles.append(handle)
            for name in names:
                start, stop = header[name]["data_offsets"]
                self.where[name] = (i, 8 + len(text) + start, stop - start)
        self._written: set[str] = set()

    def write(self, name: str, pieces: Iterable[Tensor]) -> None:
        """Write tensor ``name`` from its pieces: flat slices in the planned dtype, in flat order, covering it once.

        Raises:
            RuntimeError: a piece of another dtype, or pieces that do not add up to the tensor (a bug).
        """
        shard, start, nbytes = self.where[name]
        handle, written = self._handles[shard], 0
        handle.seek(start)
        for piece in pieces:
            if _DTYPE_CODES.get(piece.dtype) != self.layout[name].dtype:
                raise RuntimeError(f"'{name}': a {piece.dtype} piece for a {self.layout[name].dtype} tensor.")
            data = piece.contiguous().reshape(-1).view(torch.uint8).numpy()
            handle.write(data)
            written += data.nbytes
        if written != nbytes:
            raise RuntimeError(f"'{name}': wrote {written} bytes of {nbytes}.")
        self._written.add(name)

    def close(self) -> None:
        """Close the shards and write the index (several shards).

        Raises:
            RuntimeError: a planned tensor was never written (a bug).
        """
        for handle in self._handles:
            handle.close()
        unwritten = [n for n in self.layout if n not in self._written]
        if unwritten:
            raise RuntimeError(f"{len(unwritten)} tensor(s) planned but not written (e.g. '{unwritten[0]}').")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_size, "sa_lens_version": _version()},
                "weight_map": {n: self.files[self.where[n][0]] for n in sorted(self.layout)},
            }
            (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # leave the partial files for inspection, but close them
            for handle in self._handles:
                handle.close()


def _shard_size(size: int | str) -> int:
    try:
        limit = convert_file_size_to_int(size)
    except (ValueError, AttributeError) as exc:
        raise InputError(f"max_shard_size: {size!r} is not a size such as 5000000000, '5GB' or '2GiB'.") from exc
    if not isinstance(limit, int) or limit <= 0:
        raise InputError(f"max_shard_size must be a positive number of bytes; got {size!r}.")
    return limit


def _nbytes(spec: TensorSpec) -> int:
    return spec.numel * _ELEMENT_SIZE[spec.dtype]


_ELEMENT_SIZE = {code: torch.empty(0, dtype=dtype).element_size() for dtype, code in _DTYPE_CODES.items()}


def _version() -> str:
    return version("sa_lens")


def finish_folder(src: Path, out: Path, layout: dict[str, TensorSpec], card: dict) -> None:
    """Everything but the weights: the target's other files copied (tokenizer, generation config, chat template),
    ``config.json`` with the weights' dtype recorded, and a provenance card ``README.md``.

    ``card`` holds what produced the weights (portable model names, λ, top-k, scope, count, the harm vector's
    digest, thresholds); it goes into the card's YAML front matter under ``sa_lens``, with the version added.
    """
    weight_root = src if src.is_dir() else src.parent
    for other in weight_root.iterdir():
        # Pickle weights beside the safetensors (pytorch_model.bin and its index) hold the *unedited* θt:
        # copied, they would give the original model to anyone loading with use_safetensors=False. The target's
        # index, config and card are replaced by this export's.
        stale = other.suffix in (".safetensors", ".h5", ".msgpack", *PICKLE_SUFFIXES) or other.name.endswith(".index.json")
        if other.is_file() and not stale and other.name not in ("config.json", "README.md"):
            shutil.copy2(other, out / other.name)
    dtype = _weights_dtype(layout)
    config_file = weight_root / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        if dtype is not None:
            # transformers 5 writes "dtype"; earlier releases and many tools (vLLM, llama.cpp's converter) read
            # "torch_dtype": both are set, so every reader finds the dtype the weights are stored in.
            config["dtype"] = config["torch_dtype"] = dtype
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(_card_text(card | {"version": _version()}))


def _weights_dtype(layout: dict[str, TensorSpec]) -> str | None:
    """The dtype holding most of the floating-point bytes (a checkpoint may keep a few fp32 norms beside bf16)."""
    share: dict[str, int] = {}
    for spec in layout.values():
        if spec.is_float:
            share[spec.dtype] = share.get(spec.dtype, 0) + _nbytes(spec)
    return _DTYPE_NAMES[max(share, key=share.__getitem__)] if share else None


def _card_text(card: dict) -> str:
    front = {
        "base_model": card["target"],
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["sa-lens", "safety-arithmetic", "harm-direction-removal"],
        "sa_lens": card,
    }
    trim = "untrimmed (the task vector, HDR‡)" if card.get("top_k") is None else (
        f"top-k {card['top_k']} by |τH|, scope {card['scope']}, count {card['count']}"
    )
    lines = [
        "---",
        *_yaml(front),
        "---",
        "",
        f"# {card['target']} with the harm direction removed",
        "",
        "θ̂ = θt − λ·τH′ (Harm Direction Removal, Safety Arithmetic, Hazra et al., EMNLP 2024), written by "
        f"sa_lens {card['version']}.",
        "",
        f"- target θt: `{card['target']}`",
        f"- harm vector τH = θH − θb with θb `{card.get('base')}` and θH `{card.get('harmful')}`, {trim}",
        f"- λ = {card['lam']}; arithmetic in float32, each weight cast back to its stored dtype",
        f"- harm vector digest (sha256; `sa_lens.export.harm_vector_digest`): `{card['harm_vector_sha256']}`",
        "",
    ]
    return "\n".join(lines)


def _yaml(obj: dict, indent: str = "") -> list[str]:
    """Block YAML for nested dicts of JSON scalars and lists (each scalar written as JSON, which YAML reads)."""
    lines = []
    for key, value in obj.items():
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{json.dumps(str(key), ensure_ascii=False)}:")
            lines.extend(_yaml(value, indent + "  "))
        else:
            lines.append(f"{indent}{json.dumps(str(key), ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}")
    return lines


def _portable_or_none(value: str | None) -> str | None:
    return None if value is None else portable_name(value)


def harm_vector_digest(hv: HarmVector) -> str:
    """SHA-256 (hex) of τH′'s non-zero entries, whatever form they are held in (dense or sparse).

    Per tensor, in name order: ``name:shape:nnz:`` then the SHA-256 of its flat int64 indices (increasing) and
    the SHA-256 of their float32 values, little-endian. The export cards record it; the streamed export
    (:func:`sa_lens.streamed_export.export_harm_removed_streamed`) computes the same digest without holding
    τH′, so a card written from three folders can be checked against ``HarmVector.from_checkpoints``.
    """
    digest = HarmDigest()
    for name in sorted(hv.deltas):
        sparse = hv.sparse(name)
        digest.add(sparse.indices, sparse.values)
        digest.tensor_done(name, sparse.shape)
    return digest.hexdigest()


class HarmDigest:
    """The running form of :func:`harm_vector_digest`: kept entries added piece by piece, tensors in name order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._reset()

    def _reset(self) -> None:
        self._indices, self._values, self._nnz = hashlib.sha256(), hashlib.sha256(), 0

    def add(self, indices: Tensor, values: Tensor) -> None:
        """Kept entries of the current tensor: flat int64 indices (increasing, after those added before) and fp32 values."""
        self._indices.update(indices.to(torch.int64).contiguous().numpy())  # host byte order: little-endian on
        self._values.update(values.to(torch.float32).contiguous().numpy())  # every platform torch ships for
        self._nnz += indices.numel()

    def tensor_done(self, name: str, shape: tuple[int, ...]) -> None:
        self._h.update(f"{name}:{list(shape)}:{self._nnz}:".encode() + self._indices.digest() + self._values.digest())
        self._reset()

    def hexdigest(self) -> str:
        return self._h.hexdigest()
