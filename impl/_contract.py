"""Every argument check of masknorm: the contract of masked normalization (shapes and scalars), the
tensors' kinds, and the layers' settings. Nothing here reads tensor values.

masked_norm's checks are shared by the torch implementation and the mpmath reference, so that both
accept and reject exactly the same calls with the same messages.

    groups  = index over the axes not in R;   V = {i in group : mask_i};  k = |V|;  nu = k - c
"""

from __future__ import annotations

import functools
import math
import numbers
from numbers import Integral, Real
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


# Tensors: kinds, dtypes and devices (values are never read).

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: Optional[torch.Tensor], x: torch.Tensor, *, boolean: bool = False) -> None:
    """TypeError unless `t` is None or a tensor of the right kind on x's device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if boolean and t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = valid), got dtype {t.dtype} of shape {tuple(t.shape)}")
    if not boolean and t.dtype not in FLOATING:
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype} of shape {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def check_policy(masked: str) -> str:
    """`masked` if it is one of the contract's policies, else ValueError."""
    if masked not in POLICIES:
        raise ValueError(f"masked must be one of {POLICIES}, got {masked!r}")
    return masked


def check_mask_tensor(mask: torch.Tensor, name: str = "mask", meaning: str = "True = valid") -> None:
    """TypeError unless mask is a bool tensor."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        kind = f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor ({meaning}), got {kind}")


def check_lengths(lengths: object, name: str) -> torch.Tensor:
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.dtype.is_floating_point \
            or lengths.dtype == torch.bool or lengths.is_complex():
        kind = f"a tensor of shape {tuple(lengths.shape)} and dtype {lengths.dtype}" \
            if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise TypeError(f"{name} must be an integer tensor of shape (B,), got {kind}")
    return lengths


def check_time_mask(mask: object, name: str, meaning: str = "True = valid") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        kind = f"a tensor of shape {tuple(mask.shape)} and dtype {mask.dtype}" \
            if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor of shape (B, T), {meaning} (an int mask: "
                        f".bool()), got {kind}")
    return mask


# The modules' settings: bad settings fail at construction, naming the argument; a weight or bias of
# the wrong shape (assigned or loaded) fails with the shapes, before any reshape.

def _real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_eps(owner: str, eps: Optional[float], allow_none: bool = False) -> None:
    """eps is a finite real >= 0 (or None where the module allows it)."""
    if eps is None and allow_none:
        return
    if not _real(eps):
        raise TypeError(f"{owner}: eps must be a real number, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{owner}: eps must be finite and >= 0, got {eps!r}")


def check_momentum(owner: str, momentum: Optional[float]) -> None:
    """momentum is None (cumulative average) or a real in [0, 1]."""
    if momentum is None:
        return
    if not _real(momentum):
        raise TypeError(f"{owner}: momentum must be a real number in [0, 1] or None, got {type(momentum).__name__}")
    if not 0 <= momentum <= 1:
        raise ValueError(f"{owner}: momentum must be in [0, 1] or None, got {momentum!r}")


def check_correction(owner: str, correction: object) -> None:
    """correction is an integer >= 0 (not a bool): the variance divisor is k - correction."""
    if not isinstance(correction, Integral) or isinstance(correction, bool):
        raise TypeError(f"{owner}: correction must be an int >= 0, got {type(correction).__name__} {correction!r}")
    if correction < 0:
        raise ValueError(f"{owner}: correction must be an int >= 0, got {correction}")


def check_flag(owner: str, name: str, value: object) -> None:
    """value is a bool (a setting the functional form takes as a bool only, such as center)."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__} {value!r}")


def check_positive_int(owner: str, name: str, value: object) -> None:
    """value is an int > 0 (not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a positive int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value}")


def check_normalized_shape(owner: str, shape: Union[int, Sequence[int], torch.Size]) -> None:
    """normalized_shape is an int >= 0 or a non-empty sequence of them (0 as torch allows it: an empty
    feature axis, whose output is empty)."""
    sizes = (shape,) if isinstance(shape, int) else tuple(shape) if isinstance(shape, (Sequence, torch.Size)) else None
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes):
        raise ValueError(f"{owner}: normalized_shape must be an int >= 0 or a non-empty sequence of ints >= 0, "
                         f"got {shape!r}")


def check_groups(owner: str, num_groups: int, num_channels: int) -> None:
    """num_groups and num_channels are positive ints and num_groups divides num_channels."""
    check_positive_int(owner, "num_groups", num_groups)
    check_positive_int(owner, "num_channels", num_channels)
    if num_channels % num_groups:
        raise ValueError(f"{owner}: num_groups={num_groups} must divide num_channels={num_channels}")


def check_affine(owner: str, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 shape: Tuple[int, ...], source: str) -> None:
    """weight and bias (where present) have `shape` (the module's `source`, e.g. "num_channels")."""
    shape = tuple(shape)
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and param.shape != shape:
            raise ValueError(f"{owner}: {name} has shape {tuple(param.shape)}, expected {tuple(shape)} ({source}); "
                             "was a parameter assigned or loaded with another size?")
