"""One validated reference call: arguments checked before any work, values converted exactly to
mpf and laid out as (groups, n) matrices.

    x, weight, bias, tangents -> exact mpf;  mask -> bool;  all broadcast to x's shape, grouped
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import mpmath
import numpy as np

from masknorm._contract import NormArgs, check_args

from .convert import bool_array, float_array, optional_float_array, to_mpf
from .groups import Layout

MIN_DPS = 20  # >= 64 bits: every float64 and long double input converts exactly


@dataclass(frozen=True)
class Problem:
    """A call in group layout: rows of `x`, `mask`, `weight`, `bias` are the groups (mpf objects,
    bool for mask; weight/bias None when absent, else broadcast from `weight_shape`/`bias_shape`).
    `eps` is the exact value of the float eps; `eps_outside`: s = sigma + eps instead of
    sqrt(sigma^2 + eps) (a variant some implementations use, see masknorm.reference.oracle.semantics)."""

    args: NormArgs
    layout: Layout
    x: np.ndarray
    mask: np.ndarray
    weight: Optional[np.ndarray]
    bias: Optional[np.ndarray]
    eps: mpmath.mpf
    weight_shape: Optional[Tuple[int, ...]] = None
    bias_shape: Optional[Tuple[int, ...]] = None
    eps_outside: bool = False


def check_dps(dps: Any) -> int:
    """The working precision in decimal digits: an int >= MIN_DPS (TypeError/ValueError otherwise)."""
    if isinstance(dps, bool) or not isinstance(dps, numbers.Integral):
        raise TypeError(f"dps must be an int >= {MIN_DPS}, got {type(dps).__name__} {dps!r}")
    if dps < MIN_DPS:
        raise ValueError(f"dps must be >= {MIN_DPS} so that every input converts exactly, got {dps}")
    return int(dps)


def _same_shape(arr: Optional[np.ndarray], shape: Tuple[int, ...], name: str, of: str) -> None:
    if arr is not None and arr.shape != shape:
        raise ValueError(f"{name} must have the shape of {of} {shape}, got {arr.shape}")


def prepare(
    x: Any,
    mask: Any,
    dim: Any,
    *,
    correction: Any,
    eps: Any,
    center: Any,
    weight: Any,
    bias: Any,
    masked: Any,
    dps: Any,
    like_x: Optional[Dict[str, Any]] = None,
    like_weight: Any = None,
    like_bias: Any = None,
    eps_outside: bool = False,
) -> Tuple[Problem, Dict[str, np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]:
    """Validate every argument (types, then shapes and scalars via check_args), then convert.

    `like_x` maps names to arrays that must have x's shape (grad_out, x_dot); `like_weight` /
    `like_bias` must have weight's / bias's shape (weight_dot, bias_dot) and need weight / bias.
    Returns the Problem, the like_x arrays grouped, and like_weight / like_bias grouped (or None).
    """
    dps = check_dps(dps)
    xa = float_array(x, "x")
    ma = None if mask is None else bool_array(mask, "mask")
    wa = optional_float_array(weight, "weight")
    ba = optional_float_array(bias, "bias")
    extra = {name: float_array(a, name) for name, a in (like_x or {}).items()}
    wd = optional_float_array(like_weight, "weight_dot")
    bd = optional_float_array(like_bias, "bias_dot")
    args = check_args(
        xa.shape,
        None if ma is None else ma.shape,
        dim,
        correction=correction,
        eps=eps,
        center=center,
        masked=masked,
        weight_shape=None if wa is None else wa.shape,
        bias_shape=None if ba is None else ba.shape,
    )
    for name, a in extra.items():
        _same_shape(a, args.shape, name, "x")
    for name, tangent, primal, primal_name in (("weight_dot", wd, wa, "weight"), ("bias_dot", bd, ba, "bias")):
        if tangent is not None and primal is None:
            raise ValueError(f"{name} is given but {primal_name} is None; pass {primal_name} too")
        _same_shape(tangent, None if primal is None else primal.shape, name, primal_name)
    layout = Layout.of(args)
    with mpmath.workdps(dps):

        def grouped(a: Optional[np.ndarray]) -> Optional[np.ndarray]:
            return None if a is None else layout.to_groups(to_mpf(a))

        problem = Problem(
            args,
            layout,
            grouped(xa),
            layout.to_groups(np.ones(args.shape, bool) if ma is None else ma),
            grouped(wa),
            grouped(ba),
            mpmath.mpf(args.eps),
            None if wa is None else wa.shape,
            None if ba is None else ba.shape,
            bool(eps_outside),
        )
        return problem, {n: grouped(a) for n, a in extra.items()}, grouped(wd), grouped(bd)
