"""Constructor and parameter checks of the modules: bad settings fail at construction, naming the
argument, and a weight or bias of the wrong shape (assigned or loaded) fails with the shapes, before
any reshape. Each check is a small function that constructors and forwards call."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional, Sequence, Tuple, Union

import torch


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
