"""Read a Hugging Face checkpoint folder one tensor at a time, from safetensors only (never unpickled).

``from_pretrained`` loads a whole model; a 70B τH build cannot afford two of them. A ``Checkpoint`` reads the
shard headers once (names, dtypes, shapes) and each tensor on demand, opening its shard for that one read:
safetensors maps the shard file, and the pages a read touched stay resident until the handle closes, so one
handle per read keeps the resident set to about one tensor (measured: a handle kept open over a 400 MB shard
grew RSS by 400 MB).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from sa_lens.errors import InputError
from sa_lens.parameter_names import select_names

__all__ = [
    "Checkpoint",
    "TensorSpec",
    "check_same_layout",
    "check_same_names",
    "paired_names",
    "refuse_pickle_weights",
    "stream_pairs",
    "stream_pieces",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Output embeddings a tied checkpoint may still store (older exports); their values are the input embedding's.
_TIED_OUTPUT_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Entries of τ computed at a time by stream_pieces: 8M entries keep its reads and fp32 difference near 64 MB,
# where a whole 128k-vocabulary embedding pair would take 4 GB. Measured on a 1 B-parameter bf16 pair:
# 1M-entry pieces took 1.6× the time of 8M (per-piece overhead), 16M no faster and a higher peak.
PIECE_NUMEL = 1 << 23


@dataclass(frozen=True)
class TensorSpec:
    """Where a tensor lives and what it is, from the shard header alone."""

    file: Path
    dtype: str  # safetensors dtype code: "BF16", "F32", "I64", ...
    shape: tuple[int, ...]

    @property
    def is_float(self) -> bool:
        return self.dtype in _FLOAT_DTYPES

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Checkpoint:
    """A checkpoint folder of safetensors weights: sharded (``model.safetensors.index.json``) or single file.

    Args:
        path: the folder ``save_pretrained`` wrote (or a single ``.safetensors`` file).

    Attributes:
        files: every weight file of the checkpoint (shards holding only integer buffers or a tied output
            embedding included), sorted.
        specs: ``{name: TensorSpec}`` of every floating-point tensor, tied output embeddings dropped when
            ``config.json`` says ``tie_word_embeddings`` (they hold the input embedding's values, so τH
            would count and edit them twice). Integer and bool buffers are skipped.

    Raises:
        FileNotFoundError: no such folder, no weights in it, or a shard named in the index is missing.
        ValueError: only pickle weights (``.bin``/``.pt``, refused: unpickling runs code), a corrupted or
            non-safetensors shard, or an index naming a tensor its shard lacks.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such checkpoint folder.")
        files = self._weight_map()
        self.files: tuple[Path, ...] = tuple(sorted(set(files.values())))
        headers = {file: read_header(file) for file in self.files}
        unlisted = sorted(n for n, f in files.items() if n not in headers[f])
        if unlisted:
            raise InputError(f"{self.path}: the index names '{unlisted[0]}' but its shard does not hold it; the checkpoint is corrupted.")
        self.specs: dict[str, TensorSpec] = {n: headers[f][n] for n, f in files.items() if headers[f][n].is_float}
        if self._tied():
            for name in _TIED_OUTPUT_NAMES:
                self.specs.pop(name, None)

    def _weight_map(self) -> dict[str, Path]:
        if self.path.is_file():
            return {name: self.path for name in read_header(self.path)}
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InputError(f"{index}: not a safetensors index (no 'weight_map'): {exc}.") from exc
            files = {name: self.path / shard for name, shard in weight_map.items()}
            missing = sorted({str(f.name) for f in files.values() if not f.exists()})
            if missing:
                raise FileNotFoundError(
                    f"{self.path}: shard(s) {missing[:3]} named in {INDEX_FILE} are missing; the download or copy "
                    "is incomplete. Fetch the missing files again."
                )
            return files
        single = self.path / SINGLE_FILE
        if single.exists():
            return {name: single for name in read_header(single)}
        refuse_pickle_weights(self.path, ", or build τH in memory with HarmVector.from_models")
        raise FileNotFoundError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}; not a checkpoint folder.")

    def _tied(self) -> bool:
        config = (self.path if self.path.is_dir() else self.path.parent) / "config.json"
        if not config.exists():
            return False
        cfg = json.loads(config.read_text())
        return bool(cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get("tie_word_embeddings", False)))

    def names(self, layers: Collection[int] | None = None, kinds: Collection[str] | None = None) -> list[str]:
        """Floating-point tensor names in file order, optionally restricted (see :func:`select_names`)."""
        return select_names(self.specs, layers, kinds)

    def read(self, name: str) -> Tensor:
        """One tensor, in its stored dtype.

        Raises:
            KeyError: an unknown name.
            ValueError: the shard cannot be read (truncated or corrupted).
        """
        return self.read_rows(name, None)

    def read_rows(self, name: str, rows: slice | None) -> Tensor:
        """Rows ``rows`` (along the first dimension) of one tensor, in its stored dtype; None reads it whole.

        Only those rows are read from disk (``safe_open(...).get_slice``).

        Raises:
            KeyError: an unknown name.
            ValueError: the shard cannot be read (truncated or corrupted).
        """
        spec = self.specs[name]
        try:
            with safe_open(str(spec.file), "pt") as f:
                return f.get_tensor(name) if rows is None else f.get_slice(name)[rows]
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{spec.file}: cannot read '{name}' ({exc}); the file is truncated or corrupted.") from exc


def refuse_pickle_weights(folder: Path, other_fix: str = "") -> None:
    """Raise ValueError when ``folder`` holds pickle weights (``.bin``/``.pt``) but no ``model.safetensors`` or
    its index — the only safetensors names transformers loads weights from, so any other ``.safetensors``
    beside a pickle (an ``adapter_model.safetensors``) would not stop it from unpickling the ``.bin``.

    ``other_fix`` is appended to the message's suggested fix.
    """
    if (folder / SINGLE_FILE).exists() or (folder / INDEX_FILE).exists():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InputError(
            f"{folder}: holds only pickle weights ({pickles[0]}); sa_lens never unpickles (it can run code). "
            "Convert once in a trusted environment: AutoModelForCausalLM.from_pretrained(path)."
            f"save_pretrained(out, safe_serialization=True){other_fix}."
        )


def read_header(file: Path) -> dict[str, TensorSpec]:
    """Name → dtype and shape of every tensor in one safetensors file, from its header (no tensor is read).

    Raises:
        InputError: a file that is not readable safetensors.
    """
    try:
        with safe_open(str(file), "pt") as f:
            return {n: TensorSpec(file, f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape())) for n in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{file}: not a readable safetensors file ({exc}); it is corrupted or of another format.") from exc


def paired_names(
    base: Checkpoint, harmful: Checkpoint, layers: Collection[int] | None = None, kinds: Collection[str] | None = None
) -> list[str]:
    """The names τH is built over, after checking the two checkpoints share names and shapes.

    Raises:
        ValueError: names or shapes differ (message lists the first differences and the fix).
    """
    nb, nh = base.names(layers, kinds), harmful.names(layers, kinds)
    check_same_names(nb, nh)
    for name in nb:
        check_same_layout(name, base.specs[name].shape, harmful.specs[name].shape, base.specs[name].dtype, harmful.specs[name].dtype)
    return nb


def check_same_names(base_names: Collection[str], harmful_names: Collection[str]) -> None:
    """Raise ValueError naming the first parameters only one of θb, θH has."""
    only_b, only_h = sorted(set(base_names) - set(harmful_names)), sorted(set(harmful_names) - set(base_names))
    if only_b or only_h:
        raise InputError(
            "Base and harmful models have different parameter names "
            f"(only in base: {only_b[:3]}{'…' if len(only_b) > 3 else ''}; "
            f"only in harmful: {only_h[:3]}{'…' if len(only_h) > 3 else ''}). "
            "τH needs two checkpoints of the same architecture: fine-tune θH from θb."
        )


def check_same_layout(name: str, base_shape, harmful_shape, base_dtype, harmful_dtype) -> None:
    """Raise ValueError when a parameter's shape or dtype differs between θb and θH."""
    if tuple(base_shape) != tuple(harmful_shape):
        raise InputError(
            f"Parameter '{name}' has shape {tuple(base_shape)} in base but {tuple(harmful_shape)} in harmful; "
            "the two models must share one architecture and vocabulary."
        )
    if base_dtype != harmful_dtype:
        raise InputError(
            f"Parameter '{name}' is {base_dtype} in base but {harmful_dtype} in harmful; the difference would be "
            "mostly rounding noise. Load both checkpoints in the same dtype (float32 recommended)."
        )


def _fp32_difference(harmful: Tensor, base: Tensor) -> Tensor:
    """θH − θb as :meth:`sa_lens.harm_vector.HarmVector.from_models` computes it: each rounded to float32 first.

    A bf16/fp16/fp32 base is cast inside ``sub_`` (exact, and no second fp32 copy is kept); an fp64 one is
    rounded first, since ``sub_`` would subtract it in fp64 and round once, which differs in nearly every entry.
    """
    delta = harmful.to(torch.float32)
    return delta.sub_(base if base.element_size() <= 4 else base.to(torch.float32))


def stream_pairs(base: Checkpoint, harmful: Checkpoint, names: list[str]) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, τ)`` with τ = θH − θb in float32, one tensor pair in memory at a time."""
    for name in names:
        delta = _fp32_difference(harmful.read(name), base.read(name))
        yield name, delta
        del delta  # else it stays alive while the next pair is read


def stream_pieces(
    base: Checkpoint, harmful: Checkpoint, names: list[str], piece_numel: int | None = None
) -> Iterator[tuple[str, int, Tensor]]:
    """Yield ``(name, start, τ_piece)``: τ = θH − θb in float32, flat, by whole rows of about ``piece_numel``
    entries (at least one row; default :data:`PIECE_NUMEL`), ``start`` its flat offset in the tensor; one piece
    pair in memory at a time.

    Raises:
        ValueError: a shard cannot be read.
    """
    piece_numel = PIECE_NUMEL if piece_numel is None else piece_numel
    for name in names:
        shape = base.specs[name].shape
        if not shape:  # a 0-d tensor: no rows to slice
            yield name, 0, _fp32_difference(harmful.read(name), base.read(name)).reshape(-1)
            continue
        row = math.prod(shape[1:])
        step = max(1, piece_numel // max(row, 1))
        for first in range(0, shape[0], step):
            rows = slice(first, min(first + step, shape[0]))
            delta = _fp32_difference(harmful.read_rows(name, rows), base.read_rows(name, rows))
            yield name, first * row, delta.reshape(-1)
            del delta
