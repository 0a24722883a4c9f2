"""One trimmed harm-vector tensor held as flat indices + values, so a top-k τH′ costs 12 bytes per kept entry.

A dense fp32 τH′ of a 7B model is 27 GB however few entries survive the trim; the sparse form is what lets a
streaming build (``HarmVector.from_checkpoints``) and ``harm_removal`` stay within memory at research scale
(design.md §3, "Global top-k at scale").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int64
from torch import Tensor

from sa_lens.errors import InputError

__all__ = ["SparseDelta", "compact"]

# Above this density a dense fp32 tensor (4 bytes/entry) is smaller than int64 index + fp32 value (12 bytes).
DENSE_ABOVE = 1 / 3


@dataclass(frozen=True)
class SparseDelta:
    """A float32 tensor of ``shape`` that is zero except at ``indices`` (into its row-major flattening).

    Attributes:
        shape: the dense shape.
        indices: ``Int64[Tensor, " nnz"]``, strictly increasing flat positions.
        values: ``Float[Tensor, " nnz"]``, float32, the entries at those positions.
    """

    shape: tuple[int, ...]
    indices: Int64[Tensor, " nnz"]
    values: Float[Tensor, " nnz"]

    def __post_init__(self) -> None:
        if self.indices.dtype != torch.int64 or self.values.dtype != torch.float32:
            raise InputError(f"SparseDelta needs int64 indices and float32 values; got {self.indices.dtype}, {self.values.dtype}.")
        if self.indices.shape != self.values.shape or self.indices.dim() != 1:
            raise InputError(f"indices {tuple(self.indices.shape)} and values {tuple(self.values.shape)} must be equal 1-D.")

    @classmethod
    def from_dense(cls, t: Float[Tensor, "..."]) -> SparseDelta:
        """The non-zero entries of a float32 tensor."""
        flat = t.reshape(-1)
        idx = torch.nonzero(flat).squeeze(1)
        return cls(tuple(t.shape), idx, flat[idx].clone())

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        """Bytes held: indices + values."""
        return self.indices.numel() * 8 + self.values.numel() * 4

    def __repr__(self) -> str:
        density = self.nnz / self.numel if self.numel else 0.0
        return f"SparseDelta(shape={self.shape}, nnz={self.nnz}, density={density:.3g})"

    def to_dense(self) -> Float[Tensor, "..."]:
        dense = torch.zeros(self.numel, dtype=torch.float32)
        dense[self.indices] = self.values
        return dense.view(self.shape)


def compact(indices: Int64[Tensor, " nnz"], values: Float[Tensor, " nnz"], shape: tuple[int, ...]) -> Tensor | SparseDelta:
    """The cheaper of the two forms: dense when more than a third of the entries are kept, sparse otherwise."""
    if indices.numel() > DENSE_ABOVE * math.prod(shape):
        return SparseDelta(shape, indices, values).to_dense()
    return SparseDelta(shape, indices, values)
