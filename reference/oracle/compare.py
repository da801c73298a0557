"""How far a candidate's outputs and gradients are from the reference, in units of u*kappa.

    forward:  max |y - y*| / (u (kappa |gamma| + |beta|));   gradient: max over groups of max|g - g*| / (scale * max size)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import mpmath
import numpy as np

from ..error import error_in_ukappa
from ..forward import all_stats
from ..problem import prepare


def forward_error(
    y: Any,
    y_ref: np.ndarray,
    kappa: np.ndarray,
    *,
    dtype: Any,
    where: Optional[np.ndarray] = None,
    weight: Any = None,
    bias: Any = None,
) -> float:
    """Worst error_in_ukappa over the positions in `where` (all when None) at which y* is finite;
    inf when y is finite at a position of `where` where y* is not, or the other way round."""
    got = np.asarray(y, dtype=np.float64)
    selected = np.ones(y_ref.shape, bool) if where is None else np.broadcast_to(where, y_ref.shape)
    finite = np.isfinite(y_ref)
    if not np.array_equal(np.isfinite(got)[selected], finite[selected]):
        return float("inf")
    err = error_in_ukappa(got, y_ref, kappa, dtype=dtype, weight=weight, bias=bias)
    chosen = err[selected & finite]
    return float(chosen.max()) if chosen.size else 0.0


def normwise_error(got: Any, want: np.ndarray, size: np.ndarray, scale: Any, axes: Sequence[int]) -> float:
    """max over groups (reducing `axes`) of max|got - want| / (scale * max size), where `size` is the
    magnitude a group's errors are measured against. Equal values (NaN with NaN, the same infinity)
    count as no error; a NaN on one side, or an error on a zero size, is inf."""
    got = np.asarray(got, dtype=np.float64)
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    with np.errstate(invalid="ignore"):
        delta = np.where(same, 0.0, np.abs(got - want))
    delta = np.where(np.isnan(delta), np.inf, delta)
    axes = tuple(axes)
    top = np.max(size, axis=axes, keepdims=True)
    worst = np.max(delta, axis=axes, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(worst == 0, 0.0, worst / (scale * top))
    return float(np.where(np.isnan(ratio), np.inf, ratio).max()) if ratio.size else 0.0


def inverse_s(
    x: Any, mask: Any, dim: Any, *, correction: int, eps: float, center: bool, dps: int = 50
) -> np.ndarray:
    """1/s of each position's group in x's shape (float64), 0 exactly on the degenerate groups (they
    have no s; elsewhere s <= sqrt(n) * the largest float64, so 1/s never rounds to 0)."""
    problem, _, _, _ = prepare(
        x, mask, dim, correction=correction, eps=eps, center=center, weight=None, bias=None, masked="normalize", dps=dps
    )
    with mpmath.workdps(dps):
        per_group = [0.0 if st.degenerate else float(1 / st.s) for st in all_stats(problem)]
    rows = np.broadcast_to(np.array(per_group).reshape(-1, 1), problem.mask.shape)
    return problem.layout.from_groups(rows)
