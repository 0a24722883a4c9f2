"""Torch's float32 matmul precision: which one is in force on a device, and setting one for a block.

``torch.set_float32_matmul_precision("medium")`` lets float32 matmuls take bf16 inputs (fp32 accumulation)
on AMX CPUs and GPUs, several times faster and slightly less exact. Torch ≥ 2.9 also keeps one setting per
backend (``torch.backends.mkldnn.matmul.fp32_precision``, ``torch.backends.cuda.matmul.fp32_precision``);
once one of those is set directly, ``torch.get_float32_matmul_precision()`` raises, so both are read here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from sa_lens.errors import InputError

__all__ = ["float32_matmul_precision", "matmul_precision_in_force"]

_PRECISIONS = ("highest", "high", "medium")


def _backends() -> dict[str, object]:
    """Objects that carry an ``fp32_precision`` setting (none before torch 2.9)."""
    # Generic first: setting it rewrites the backends' own values, so it must be restored before them.
    found = {"generic": torch.backends, "mkldnn": torch.backends.mkldnn.matmul, "cuda": torch.backends.cuda.matmul}
    return {name: obj for name, obj in found.items() if hasattr(obj, "fp32_precision")}


def matmul_precision_in_force(device: str | torch.device) -> str:
    """The float32 matmul precision torch uses on ``device``.

    Returns:
        ``"ieee"`` (exact fp32, torch's default), ``"tf32"`` or ``"bf16"`` (matmul inputs rounded, fp32
        accumulation) for CPU and CUDA; on torch < 2.9 or other devices, the legacy name ``"highest"`` /
        ``"high"`` / ``"medium"``. It is the setting, not a promise that the hardware honours it (a CPU
        without AMX or AVX-512-BF16 runs "bf16" in full fp32).
    """
    backends = _backends()
    own = {"cpu": "mkldnn", "cuda": "cuda"}.get(torch.device(device).type)
    if own in backends:
        # "none" defers to the generic setting, which defers to exact fp32.
        for name in (own, "generic"):
            value = backends[name].fp32_precision
            if value != "none":
                return value
        return "ieee"
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:  # backends set one by one: there is no single answer for an unknown device
        return "mixed"


@contextmanager
def float32_matmul_precision(precision: Literal["highest", "high", "medium"]) -> Iterator[None]:
    """Run a block under ``torch.set_float32_matmul_precision(precision)``; every setting is restored on exit.

    Raises:
        ValueError: ``precision`` is not one of "highest", "high", "medium".
    """
    if precision not in _PRECISIONS:
        raise InputError(f"precision must be 'highest', 'high' or 'medium'; got {precision!r}.")
    backends = _backends()
    saved = {name: obj.fp32_precision for name, obj in backends.items()}
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # backends set one by one: their own values below are the whole state
        legacy = None
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        # The legacy setter also overwrote each backend's own value ("none" = follow the global one);
        # putting those back restores exactly what was there.
        for name, value in saved.items():
            backends[name].fp32_precision = value
