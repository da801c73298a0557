"""How far a candidate's outputs and gradients are from the reference, in units of u*kappa.

    forward:  max |y - y*| / (u (kappa |gamma| + |beta|));   gradient: max over groups of max|g - g*| / (scale * max size)

and what the reference says about one example (output, kappa, 1/s, VJP), computed in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import mpmath
import numpy as np

from ..convert import to_float64
from ..derivatives import vjp_mp
from ..error import error_in_ukappa
from ..forward import all_stats, normalize_mp
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


@dataclass(frozen=True)
class ReferenceValues:
    """The reference's view of one example, float64 in x's shape, from one pass over its groups:
    the output `y`, `kappa` = (|mu| + sigma)/s (1 on degenerate groups), `inv_s` = 1/s (0 exactly
    on degenerate groups: they have no s; elsewhere s <= sqrt(n) * the largest float64, so 1/s
    never rounds to 0) and `gx`, the VJP for the given upstream gradient (None without one)."""

    y: np.ndarray
    kappa: np.ndarray
    inv_s: np.ndarray
    gx: Optional[np.ndarray] = None

    @property
    def degenerate(self) -> np.ndarray:
        """The positions of degenerate groups (ν <= 0, or no spread with eps = 0)."""
        return self.inv_s == 0


def reference_values(
    x: Any,
    mask: Any,
    dim: Any,
    *,
    correction: int,
    eps: float,
    center: bool,
    masked: str = "normalize",
    eps_outside: bool = False,
    grad_out: Any = None,
    dps: int = 50,
) -> ReferenceValues:
    """ReferenceValues of masked_norm(x, mask, dim, ...) at `dps` digits (each value rounded once)."""
    problem, extra, _, _ = prepare(
        x, mask, dim, correction=correction, eps=eps, center=center, weight=None, bias=None, masked=masked, dps=dps,
        eps_outside=eps_outside, like_x=None if grad_out is None else {"grad_out": grad_out},
    )
    with mpmath.workdps(dps):
        stats = all_stats(problem)
        y = to_float64(normalize_mp(problem, stats))
        kap = [mpmath.mpf(1) if st.degenerate else (abs(st.mu) + st.sigma) / st.s for st in stats]
        inv = [mpmath.mpf(0) if st.degenerate else 1 / st.s for st in stats]
        gx = None if grad_out is None else to_float64(vjp_mp(problem, extra["grad_out"], stats)[0])

    def spread(per_group: list) -> np.ndarray:
        rows = np.broadcast_to(to_float64(np.array(per_group, dtype=object)).reshape(-1, 1), problem.mask.shape)
        return problem.layout.from_groups(rows)

    return ReferenceValues(y, spread(kap), spread(inv), gx)


def inverse_s(
    x: Any, mask: Any, dim: Any, *, correction: int, eps: float, center: bool, dps: int = 50
) -> np.ndarray:
    """1/s of each position's group in x's shape (float64), 0 exactly on the degenerate groups."""
    return reference_values(x, mask, dim, correction=correction, eps=eps, center=center, dps=dps).inv_s
