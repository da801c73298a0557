"""The error metric: a candidate's distance to the reference in units of u * kappa.

    kappa = (|mu| + sigma)/s per group (1 on degenerate groups);  err = |y - y*| / (u (kappa |gamma| + |beta|))
"""

from __future__ import annotations

from typing import Any, Optional

import mpmath
import numpy as np
import torch

from .convert import bool_array, float_array, optional_float_array, to_float64
from .forward import all_stats
from .problem import prepare

_UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}


def unit_roundoff(dtype: Any) -> float:
    """u of a floating dtype (torch dtype, numpy dtype or name): half the gap between 1 and the next
    float: float64 2^-53, float32 2^-24, float16 2^-11, bfloat16 2^-8."""
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else None
    if name is None:
        try:
            name = np.dtype(dtype).name
        except TypeError as err:
            raise TypeError(f"dtype must be a torch or numpy floating dtype, got {dtype!r}") from err
    if name not in _UNIT_ROUNDOFF:
        raise ValueError(f"dtype must be one of {tuple(_UNIT_ROUNDOFF)}, got {dtype!r}")
    return _UNIT_ROUNDOFF[name]


def kappa(
    x: Any,
    mask: Any = None,
    dim: Any = -1,
    *,
    correction: int = 0,
    eps: float = 1e-5,
    center: bool = True,
    dps: int = 50,
    eps_outside: bool = False,
) -> np.ndarray:
    """kappa = (|mu| + sigma)/s of each position's group, in x's shape, float64 (RMS: mu = 0).

    A degenerate group gets kappa = 1: its output must equal x (or 0) exactly, so any error there is
    reported on the scale of u itself."""
    problem, _, _, _ = prepare(
        x, mask, dim, correction=correction, eps=eps, center=center, weight=None, bias=None, masked="normalize", dps=dps,
        eps_outside=eps_outside,
    )
    with mpmath.workdps(dps):
        values = []
        for stats in all_stats(problem):
            if stats.degenerate:
                values.append(mpmath.mpf(1))
            else:
                values.append((abs(stats.mu) + stats.sigma) / stats.s)
        per_group = np.array(values, dtype=object).reshape(problem.layout.groups, 1)
        return to_float64(problem.layout.from_groups(np.broadcast_to(per_group, problem.mask.shape)))


def error_in_ukappa(
    y: Any,
    y_ref: Any,
    kappa: Any,
    *,
    dtype: Any = None,
    weight: Any = None,
    bias: Any = None,
) -> np.ndarray:
    """|y - y_ref| / (u (kappa |weight| + |bias|)) per position (weight None = 1, bias None = 0, so
    without affine the scale is u kappa); u is that of `dtype`, default y's dtype. Positions where y
    equals y_ref (both NaN, or the same infinity, included) have error 0; a NaN on one side only, or a
    difference on a zero scale, is inf. Computed in float64, so with a float64 candidate the reference's
    own rounding (half an ulp of y_ref) is part of the measurement."""
    u = unit_roundoff(y.dtype if dtype is None else dtype)
    yv = float_array(y, "y").astype(np.float64)
    rv = float_array(y_ref, "y_ref").astype(np.float64)
    kv = float_array(kappa, "kappa").astype(np.float64)
    wv = optional_float_array(weight, "weight")
    bv = optional_float_array(bias, "bias")
    scale = kv * (1.0 if wv is None else np.abs(wv.astype(np.float64)))
    if bv is not None:
        scale = scale + np.abs(bv.astype(np.float64))
    scale = u * scale
    same = (yv == rv) | (np.isnan(yv) & np.isnan(rv))
    # A quotient beyond float64's range is an error of inf u*kappa, which is what is reported: not a warning.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        err = np.abs(yv - rv) / scale
    err = np.where(np.isnan(err) | (scale == 0), np.inf, err)
    return np.where(same, 0.0, err)


def max_error_in_ukappa(
    y: Any,
    y_ref: Any,
    kappa: Any,
    mask: Optional[Any] = None,
    *,
    dtype: Any = None,
    weight: Any = None,
    bias: Any = None,
) -> float:
    """max of error_in_ukappa over the positions where `mask` is True (all when None; 0 when none)."""
    err = error_in_ukappa(y, y_ref, kappa, dtype=dtype, weight=weight, bias=bias)
    if mask is not None:
        err = err[np.broadcast_to(bool_array(mask, "mask"), err.shape)]
    return float(err.max()) if err.size else 0.0
