"""A short hash of a model's weights and hooked points as they are now, read in bounded chunks.

The evaluation engine keys its records by this hash (design.md §1a), so a resume never reuses replies generated
from other weights. Per parameter it hashes the float64 sum and sum of squares, computed chunk by chunk on the
parameter's own device, so the extra memory is one float64 chunk (``CHUNK_ELEMENTS`` × 8 bytes = 32 MiB) however
large the tensor. The former whole-tensor ``p.double()`` and its square took 16 bytes per entry: 8 GiB for Llama-3
8B's 128256 × 4096 embedding, 16 GiB for a 70 B model's (measured on the 8B embedding: 36 MiB extra instead of 8019 MiB, and
4× faster; ``analyses/bench_fingerprint.py``, ``analyses/results/fingerprint/bench.json``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from sa_lens.errors import InputError
from sa_lens.models import offloaded_weights

__all__ = ["CHUNK_ELEMENTS", "content_digest", "loaded_fingerprint", "mark_loaded", "parameter_digest", "state_fingerprint"]

CHUNK_ELEMENTS = 2**22
"""Elements read (and converted to float64) at a time: 2**22 × 8 bytes = 32 MiB of extra memory per parameter."""


def _chunks(x: Tensor, n: int) -> Iterator[Tensor]:
    """Views of ``x`` that together cover every element once, each of at most ``n`` elements (``n`` ≥ 1).

    A contiguous tensor is cut along its flat view; a strided one (a transposed or sliced parameter) along its
    first dimension, recursing into rows longer than ``n``, so no chunk is ever a copy of the whole tensor.
    """
    if x.is_contiguous() or x.dim() <= 1:
        flat = x.reshape(-1)  # a view: contiguous, or already one-dimensional
        for i in range(0, flat.numel(), n):
            yield flat[i : i + n]
        return
    row = x[0].numel() if x.shape[0] else 0
    if row == 0:
        return
    if row > n:
        for r in x:
            yield from _chunks(r, n)
        return
    step = n // row
    for i in range(0, x.shape[0], step):
        yield x[i : i + step]


def parameter_digest(p: Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> tuple[float, float]:
    """The float64 sum and sum of squares of a tensor's entries, read ``chunk_elements`` at a time on its device.

    Args:
        p: any real tensor (a parameter, any shape and dtype), on any device but ``meta``.
        chunk_elements: elements converted to float64 at a time; the extra memory is 8 × this many bytes.

    Returns:
        ``(sum, sum of squares)`` as Python floats, summed chunk by chunk in a fixed order (deterministic for the
        same tensor on the same device and thread count).

    Raises:
        InputError: ``chunk_elements`` < 1.
    """
    if chunk_elements < 1:
        raise InputError(f"chunk_elements must be >= 1, got {chunk_elements}")
    with torch.no_grad():
        total = torch.zeros((), dtype=torch.float64, device=p.device)
        squares = torch.zeros((), dtype=torch.float64, device=p.device)
        for chunk in _chunks(p.detach(), chunk_elements):
            c = chunk.to(torch.float64, copy=True)  # our own copy, so squaring it in place leaves p alone
            total += c.sum()
            squares += c.mul_(c).sum()
            del c  # freed before the next chunk's copy: one float64 chunk alive at a time, not two
        return total.item(), squares.item()


def state_fingerprint(model: Any) -> str:
    """A short hash of the model's weights and hooked points as they are now (inside a state's block).

    It catches what an intervention's own fingerprint cannot: a model edited by hand before the call, or
    hooks a caller added around it. Per parameter, the float64 sum and sum of squares (read in chunks of
    :data:`CHUNK_ELEMENTS` on the parameter's own device), and the names of the hook points that carry hooks.
    Sums are deterministic on one machine and device; a resume elsewhere may redo items rather than reuse them.
    The chunked sums differ in their last bits from the whole-tensor sums sa_lens computed before, so records
    written by older versions get a different key: they are redone, not reused. Plain PyTorch hooks registered
    on the modules themselves (``register_forward_hook``) are not seen: put such a change in a state of its own
    name or folder.

    Weights accelerate offloaded to CPU or disk are read from their offload store, one tensor at a time, so a
    model loaded with an offloading device map hashes as the same model loaded whole (``cpu_offload`` by hand
    unties tied weights into two parameters, so such a model hashes differently).

    Args:
        model: a bridge or a plain HF model, in the state to fingerprint (call it inside the state's block).

    Returns:
        12 hex characters.

    Raises:
        InputError: a parameter on the meta device that no offload hook holds (an empty model).
    """
    h = hashlib.sha256()
    offloaded = offloaded_weights(model) if isinstance(model, torch.nn.Module) else {}
    for name, p in model.named_parameters():
        read = offloaded.get(id(p))
        if read is None and p.device.type == "meta":
            raise InputError(f"Parameter '{name}' is on the meta device with no weights behind it (an empty model, "
                             "e.g. from init_empty_weights); load the weights before fingerprinting or evaluating.")
        total, squares = parameter_digest(p if read is None else read())
        h.update(f"{name}:{total:.17g}:{squares:.17g};".encode())
    hooked = sorted(n for n, hp in getattr(model, "hook_dict", {}).items() if getattr(hp, "fwd_hooks", None))
    h.update(",".join(hooked).encode())
    return h.hexdigest()[:12]


LOADED_ATTRIBUTE = "_sa_lens_loaded_fingerprint"


def mark_loaded(model: Any) -> None:
    """Record the fingerprint of ``model``'s weights as loaded from their folder (a plain HF model; see
    :func:`loaded_fingerprint`)."""
    object.__setattr__(model, LOADED_ATTRIBUTE, state_fingerprint(model))


def loaded_fingerprint(model: Any) -> str | None:
    """The fingerprint :func:`mark_loaded` recorded, or None for a model sa_lens did not load.

    Comparing it with :func:`state_fingerprint` now tells whether the weights still are their folder's, which is
    what serving the folder to another engine (vLLM) assumes.
    """
    return getattr(model, LOADED_ATTRIBUTE, None)


def content_digest(model: Any, chunk_bytes: int = 1 << 26) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes, in ``chunk_bytes`` pieces copied to the CPU.

    Unlike :func:`state_fingerprint` (sums, fast, blind to entries that trade places), two models share this
    digest only when their weights are equal bit for bit: it names weight exports that are reused by name.

    Returns:
        64 hex characters.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{p.dtype}:{tuple(p.shape)};".encode())
            flat = p.detach().reshape(-1)
            step = max(1, chunk_bytes // max(1, flat.element_size()))
            for i in range(0, flat.numel(), step):
                h.update(flat[i : i + step].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
