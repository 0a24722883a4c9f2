"""What the subcommands that take model folders share: refusing a missing folder, telling a streamable checkpoint
folder from a hub id or pickle folder, and finding the edit area between two of them."""

from __future__ import annotations

from pathlib import Path

from sa_lens.checkpoints import INDEX_FILE, SINGLE_FILE
from sa_lens.errors import InputError

__all__ = ["edit_area_between", "local_or_hub", "streamable"]


def local_or_hub(name_or_path: str) -> str:
    """Refuse a path that does not exist rather than send it to the hub as a model id."""
    if not Path(name_or_path).exists() and (Path(name_or_path).is_absolute() or name_or_path.startswith((".", "~"))):
        raise FileNotFoundError(f"{name_or_path}: no such checkpoint folder.")
    return name_or_path


def streamable(name_or_path: str) -> bool:
    """Whether a folder holds safetensors weights that can be read a tensor at a time."""
    path = Path(name_or_path)
    return (path / SINGLE_FILE).exists() or (path / INDEX_FILE).exists()


def edit_area_between(base: str, edited: str, labels: tuple[str, str] = ("--base", "--target")):
    """The layers where ``edited`` differs from ``base``, ±1 (paper Eq. 11): streamed from two safetensors folders,
    compared in memory otherwise. ``labels`` name the two options in the error message.

    Raises:
        FileNotFoundError: a missing folder.
        ValueError: no decoder layer differs (names both models and the fix).
    """
    from sa_lens.edit_area import detect_edit_area
    from sa_lens.models import load_hf_model

    for path in (base, edited):
        local_or_hub(path)
    if streamable(base) and streamable(edited):
        area = detect_edit_area(base, edited)
    else:
        area = detect_edit_area(load_hf_model(base)[0], load_hf_model(edited)[0])
    if not area.layers:
        raise InputError(f"{labels[1]} {edited} does not differ from {labels[0]} {base} in any decoder layer, so there "
                         f"is no edit area; {labels[1]} must be the edited model (`sa-lens edit`) and {labels[0]} the "
                         "model it was edited from.")
    return area
