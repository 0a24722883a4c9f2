"""Vector files: a safetensors file of tensors plus a JSON sidecar that says what produced them.

Tensors are read with safetensors only (never unpickled). The sidecar (``vector.json`` beside
``vector.safetensors``) records the format, the sa_lens version and provenance; the same JSON is stored
in the safetensors header metadata, so a file that lost its sidecar is still identified.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from sa_lens.errors import InputError

__all__ = ["load_tensors", "save_tensors", "sidecar_path"]

_META_KEY = "sa_lens"


def sidecar_path(path: str | os.PathLike) -> Path:
    """``x.safetensors`` → ``x.json``."""
    return Path(path).with_suffix(".json")


def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], sidecar: dict) -> Path:
    """Write ``tensors`` to ``path`` (safetensors) and ``sidecar`` to the JSON file beside it.

    Returns:
        The safetensors path.

    Raises:
        ValueError: ``path`` does not end in ``.safetensors``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"{path}: vector files end in .safetensors (the sidecar goes to {path.stem}.json).")
    from sa_lens import __version__

    sidecar = {**sidecar, "sa_lens_version": __version__}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={_META_KEY: json.dumps(sidecar)})
    sidecar_path(path).write_text(json.dumps(sidecar, indent=2))
    return path


def load_tensors(path: str | os.PathLike, expected_format: str) -> tuple[dict[str, Tensor], dict]:
    """Read a vector file written by :func:`save_tensors` and check that it holds ``expected_format``.

    Returns:
        ``(tensors, sidecar)``; the sidecar comes from the JSON file, or from the header when the
        JSON file is missing.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, a corrupted one, or a file of another kind (names what it is).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such vector file.")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            header = (f.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(
            f"{path}: not a readable safetensors file ({exc}). It may be truncated or corrupted; re-create it."
        ) from exc
    side = sidecar_path(path)
    sidecar = json.loads(side.read_text()) if side.exists() else json.loads(header) if header else None
    if sidecar is None:
        raise InputError(f"{path}: a safetensors file without sa_lens metadata or sidecar; it was not written by sa_lens.")
    if sidecar.get("format") != expected_format:
        raise InputError(
            f"{path}: holds a {sidecar.get('format')!r}, not a {expected_format!r}; load it with the matching class."
        )
    return tensors, sidecar
