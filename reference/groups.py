"""Group layout: move the reduced axes last so that x of shape S becomes a (groups, n) matrix.

    row g = one group (an index over the kept axes),  column = a position over the reduced axes
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

from masknorm._contract import NormArgs


@dataclass(frozen=True)
class Layout:
    """The permutation (kept axes, then reduced axes) of x's shape and its (groups, n) view."""

    shape: Tuple[int, ...]
    perm: Tuple[int, ...]
    groups: int
    size: int

    @classmethod
    def of(cls, args: NormArgs) -> "Layout":
        """The layout of a validated call."""
        kept = args.kept_dims
        return cls(
            args.shape,
            kept + args.dims,
            math.prod(args.shape[d] for d in kept),
            args.group_size,
        )

    def to_groups(self, a: np.ndarray) -> np.ndarray:
        """`a` (broadcastable to x's shape) as a (groups, n) array: row g holds group g."""
        full = np.broadcast_to(a, self.shape)
        return np.transpose(full, self.perm).reshape(self.groups, self.size)

    def from_groups(self, a: np.ndarray) -> np.ndarray:
        """Inverse of to_groups: a (groups, n) array back in x's shape."""
        permuted = a.reshape(tuple(self.shape[d] for d in self.perm))
        return np.transpose(permuted, np.argsort(self.perm))


def sum_to_shape(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Sum `a` over the axes along which an array of `shape` was broadcast to a.shape (the adjoint
    of broadcasting): leading extra axes, and axes where `shape` has size 1."""
    shape = tuple(shape)
    lead = a.ndim - len(shape)
    out = a.sum(axis=tuple(range(lead))) if lead else a
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and out.shape[i] != 1)
    if axes:
        out = out.sum(axis=axes, keepdims=True)
    return out.reshape(shape)
