"""Give freed heap memory back to the operating system between the large steps of a weight edit or τH build.

glibc keeps freed blocks under its mmap threshold (≤ 32 MB: chunk temporaries, cut-down held tensors, the
fp32 intermediates of an edit) mapped, and the holes add up: measured 1.2 GB of RSS over the live data after a
1.1 B-parameter τH build, and 3.8× the saved originals inside a ``harm_removal`` block. ``malloc_trim(0)``
releases whole free pages anywhere in the heap. Elsewhere (macOS, musl) there is nothing to call: a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["release_freed_memory"]


def _load_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Return whole free heap pages to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
