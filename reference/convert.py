"""Exact conversion between floating arrays (numpy or torch, any float dtype) and mpmath numbers.

    to_mpf(a)_i = the exact real value of a_i;   to_float64(v) = fl64(v), rounded once to nearest
"""

from __future__ import annotations

from typing import Any, Optional

import mpmath
import numpy as np
import torch


def _type_name(a: Any) -> str:
    dtype = getattr(a, "dtype", None)
    return f"{type(a).__name__} of dtype {dtype}" if dtype is not None else type(a).__name__


def float_array(a: Any, name: str) -> np.ndarray:
    """`a` (numpy array, torch tensor or nested sequence of floats) as a numpy array holding the
    same values exactly: torch tensors become float64 (which holds every narrower float exactly),
    numpy keeps its dtype. Raise TypeError naming `name` unless `a` is real floating."""
    if isinstance(a, torch.Tensor):
        if not a.dtype.is_floating_point:
            raise TypeError(f"{name} must be a real floating tensor or array, got {_type_name(a)}")
        return a.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a real floating tensor or array, got {_type_name(a)}") from err
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be a real floating tensor or array, got {_type_name(a)}")
    return arr


def bool_array(a: Any, name: str) -> np.ndarray:
    """`a` (numpy array, torch tensor or nested sequence of bools) as a numpy bool array; raise
    TypeError naming `name` unless its dtype is bool (no 0/1 integers or floats)."""
    if isinstance(a, torch.Tensor):
        if a.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor or array, got {_type_name(a)}")
        return a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.dtype != np.bool_:
        raise TypeError(f"{name} must be a bool tensor or array, got {_type_name(a)}")
    return arr


def optional_float_array(a: Optional[Any], name: str) -> Optional[np.ndarray]:
    """float_array(a, name), or None when `a` is None."""
    return None if a is None else float_array(a, name)


def _exact_mpf(v: np.floating) -> mpmath.mpf:
    if not np.isfinite(v):
        return mpmath.mpf(float(v))
    num, den = v.as_integer_ratio()
    return mpmath.mpf(num) / den  # den is a power of two: exact when the precision holds num


def to_mpf(arr: np.ndarray) -> np.ndarray:
    """Object array of the exact values of a float array (call at >= 64 bits of precision, which
    the reference's dps >= 20 guarantees, so that long double mantissas fit too)."""
    if arr.dtype.itemsize <= 8:
        flat = [mpmath.mpf(v) for v in arr.astype(np.float64).ravel().tolist()]
    else:
        flat = [_exact_mpf(v) for v in arr.ravel()]
    return object_array(flat, arr.shape)


def object_array(values: list, shape: tuple) -> np.ndarray:
    """An object array of `shape` holding `values` (in C order) as they are."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out.reshape(shape)


def round_to_float64(v: mpmath.mpf) -> float:
    """fl64(v): the float64 nearest to v (ties to even, overflow to +-inf, subnormals rounded once)."""
    if not mpmath.isfinite(v):
        return float(v)
    man, exp = v.man_exp  # |v| = man * 2**exp
    sign = -1 if v < 0 else 1
    try:
        return sign * (float(man << exp) if exp >= 0 else man / (1 << -exp))  # int / int: correctly rounded
    except OverflowError:
        return sign * float("inf")


def to_float64(arr: np.ndarray) -> np.ndarray:
    """Elementwise round_to_float64 of an object array of mpf (or exact ints), as a float64 array."""
    return np.array([round_to_float64(mpmath.mpf(v)) for v in arr.ravel()], dtype=np.float64).reshape(arr.shape)
