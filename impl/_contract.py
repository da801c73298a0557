"""The argument contract of masked normalization, checked on shapes and scalars only.

Shared by the torch implementation and the mpmath reference so that both accept and reject
exactly the same calls with the same messages. Nothing here touches tensor values.

    groups  = index over the axes not in R;   V = {i in group : mask_i};  k = |V|;  nu = k - c
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

Shape = Tuple[int, ...]
Dim = Union[int, Sequence[int]]

POLICIES = ("normalize", "keep", "zero")


@dataclass(frozen=True)
class NormArgs:
    """Validated arguments: `dims` sorted, non-negative and unique."""

    shape: Shape
    dims: Tuple[int, ...]
    correction: int
    eps: float
    center: bool
    masked: str

    @property
    def kept_dims(self) -> Tuple[int, ...]:
        """The axes that index groups (not reduced)."""
        return tuple(d for d in range(len(self.shape)) if d not in self.dims)

    @property
    def group_size(self) -> int:
        """n: the number of positions in one group."""
        return math.prod(self.shape[d] for d in self.dims)


def broadcasts_onto(small: Sequence[int], big: Sequence[int]) -> bool:
    """True when a tensor of shape `small` broadcasts to `big` without changing `big`."""
    if len(small) > len(big):
        return False
    # `s == 1 or s == b`, not `s in (1, b)`: under torch.compile with dynamic shapes (torch 2.13)
    # Dynamo evaluates `8 in (1, s)` as False when the symbolic size s is 8.
    return all(s == 1 or s == b for s, b in zip(reversed(tuple(small)), reversed(tuple(big))))


def normalize_dims(dim: Dim, ndim: int) -> Tuple[int, ...]:
    """`dim` (int or sequence of ints, negative counts from the end) as sorted unique axes."""
    if isinstance(dim, bool) or not isinstance(dim, (numbers.Integral, Sequence)) or isinstance(dim, str):
        raise TypeError(f"dim must be an int or a tuple of ints, got {type(dim).__name__} {dim!r}")
    dims = (dim,) if isinstance(dim, numbers.Integral) else tuple(dim)
    if not dims:
        raise ValueError("dim must name at least one axis to reduce, got an empty sequence")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"dim must be an int or a tuple of ints, got element {d!r} in dim={dim!r}")
        if not -ndim <= d < ndim:
            raise ValueError(f"dim={dim!r} is out of range for x with {ndim} dimensions")
    # Each axis a named by comparison (a == d), never by d's own value: under torch.compile with
    # dynamic shapes an int argument can arrive symbolic, and the comparison turns it into a guarded
    # constant, so every later `a in dims` and sum over dims sees plain ints.
    named = [sum(1 for d in dims if a == d % ndim) for a in range(ndim)]
    if any(n > 1 for n in named):
        raise ValueError(f"dim={dim!r} names the same axis twice (x has {ndim} dimensions)")
    return tuple(a for a in range(ndim) if named[a])


def check_args(
    x_shape: Sequence[int],
    mask_shape: Optional[Sequence[int]] = None,
    dim: Dim = -1,
    *,
    correction: int = 0,
    eps: float = 1e-5,
    center: bool = True,
    masked: str = "normalize",
    weight_shape: Optional[Sequence[int]] = None,
    bias_shape: Optional[Sequence[int]] = None,
) -> NormArgs:
    """Validate a masked_norm call by shapes and scalars; raise TypeError/ValueError naming the argument."""
    shapes = (x_shape, mask_shape, dim, weight_shape, bias_shape)
    if not torch.compiler.is_compiling() and _cacheable(*shapes):
        shape, dims = _check_shapes_cached(*shapes)
    else:
        shape, dims = _check_shapes(*shapes)
    if type(correction) is not int and (isinstance(correction, bool) or not isinstance(correction, numbers.Integral)):
        raise TypeError(f"correction must be an int >= 0, got {type(correction).__name__} {correction!r}")
    if correction < 0:
        raise ValueError(f"correction must be >= 0, got {correction}")
    if type(eps) is not float and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)):
        raise TypeError(f"eps must be a real number >= 0, got {type(eps).__name__} {eps!r}")
    if not (eps >= 0 and eps < math.inf):  # not math.isfinite: Dynamo cannot trace it on a symbolic float
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    if not isinstance(center, bool):
        raise TypeError(f"center must be a bool, got {type(center).__name__} {center!r}")
    if masked not in POLICIES:
        raise ValueError(f"masked must be one of {POLICIES}, got {masked!r}")
    return NormArgs(shape, dims, int(correction), float(eps), center, masked)


def _check_shapes(x_shape, mask_shape, dim, weight_shape, bias_shape) -> Tuple[Shape, Tuple[int, ...]]:
    """(x's shape as a tuple, the normalized dims) after the shape checks of check_args."""
    shape = tuple(x_shape)  # not int(s): under torch.export that would specialize every symbolic size
    if len(shape) == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    dims = normalize_dims(dim, len(shape))
    if mask_shape is not None and not broadcasts_onto(mask_shape, shape):
        raise ValueError(
            f"mask of shape {tuple(mask_shape)} does not broadcast to x of shape {shape} "
            "(it may have size 1 where x does not, but must not add or enlarge dimensions)"
        )
    for name, s in (("weight", weight_shape), ("bias", bias_shape)):
        if s is not None and not broadcasts_onto(s, shape):
            raise ValueError(f"{name} of shape {tuple(s)} does not broadcast to x of shape {shape}")
    return shape, dims


# A pure function of its arguments; only called with tuples of plain ints (and dim an int), whose
# equal keys are equal values: never a bool or float that compares equal to an int, never a SymInt.
_check_shapes_cached = functools.lru_cache(maxsize=512)(_check_shapes)


def _ints(values: object) -> bool:
    return isinstance(values, tuple) and all(type(v) is int for v in values)


def _cacheable(x_shape, mask_shape, dim, weight_shape, bias_shape) -> bool:
    """True when the shape checks may be looked up: every size and axis a plain int."""
    return (
        _ints(x_shape)
        and (type(dim) is int or _ints(dim))
        and (mask_shape is None or _ints(mask_shape))
        and (weight_shape is None or _ints(weight_shape))
        and (bias_shape is None or _ints(bias_shape))
    )
