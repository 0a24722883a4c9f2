"""The one syntax for choosing decoder layers: ``4-6``, ``4,5,6``, ``4-6,10`` (every ``--layers`` option).

Layers are counted from 0, as TransformerLens' ``blocks.{i}`` and the checkpoints' ``model.layers.{i}`` are; a
range includes both ends (``4-6`` is 4, 5 and 6, the official EDIT setting).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Collection

from sa_lens.errors import InputError

__all__ = ["check_layers", "layers_argument", "parse_layers"]

_ITEM = re.compile(r"([0-9]+)(?:\s*-\s*([0-9]+))?")
_SYNTAX = "write layers like 4-6, 4,5,6 or 4-6,10 (counted from 0, ranges include both ends)"


def parse_layers(spec: str, n_layers: int | None = None) -> list[int]:
    """Read a layer spec such as ``"4-6,10"`` into sorted, distinct layer indices.

    Args:
        spec: comma-separated layer numbers and inclusive ``low-high`` ranges; spaces anywhere are ignored.
        n_layers: the model's number of decoder layers; when given, every layer must be in ``0..n_layers-1``.

    Returns:
        The layers, ascending, each once: ``"6,4-5,5"`` → ``[4, 5, 6]``.

    Raises:
        InputError: the spec is empty, an item is not a number or range (``a``, ``-1``, ``4,,5``), a range runs
            backwards (``6-4``), or a layer is outside the model's ``n_layers``.
    """
    if not spec.strip():
        raise InputError(f"the layer spec is empty; {_SYNTAX}.")
    layers: set[int] = set()
    for item in spec.split(","):
        item = item.strip()
        match = _ITEM.fullmatch(item)
        if match is None:
            problem = "is negative" if item.startswith("-") else "is not a layer number or a low-high range"
            raise InputError(f"layers {spec!r}: {item!r} {problem}; {_SYNTAX}.")
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise InputError(f"layers {spec!r}: {item!r} runs backwards; write {high}-{low}.")
        layers.update(range(low, high + 1))
    chosen = sorted(layers)
    if n_layers is not None:
        check_layers(chosen, n_layers)
    return chosen


def check_layers(layers: Collection[int], n_layers: int, what: str = "layers") -> None:
    """Refuse layers a model with ``n_layers`` decoder layers lacks (a typo would otherwise shrink a selection).

    Raises:
        InputError: naming the absent layers and the model's range ``0..n_layers-1``.
    """
    absent = sorted(layer for layer in set(layers) if not 0 <= layer < n_layers)
    if absent:
        raise InputError(f"{what} {absent} are out of range: the model has {n_layers} decoder layers "
                         f"(0-{n_layers - 1}).")


def layers_argument(spec: str) -> list[int]:
    """:func:`parse_layers` as an argparse ``type=``: a bad spec is a usage error (exit 2) naming the syntax.

    Raises:
        argparse.ArgumentTypeError: with :func:`parse_layers`' message.
    """
    try:
        return parse_layers(spec)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
