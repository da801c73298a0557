"""Systematic error: an error in the statistics whose sign and relative size hold over all draws
(a bias), which the worst-case bound (64 u*kappa on one example) misses when it is a few u.

Per group with spread (not degenerate, every output finite), the error of the output at the valid
positions is fitted as

    y - y* = a * y* + b          (y* has mean 0 over the valid positions when centered; b = 0 for RMS)
    a:             the relative error of the output's scale (fn's s is s / (1 + a)), in u
    m = -b s / mu: the relative error of the subtracted mean (fn's mu is mu (1 + m)), in u

Rounding makes a and m noise of either sign, about (|mu| + sigma)/sigma and (|mu| + sigma)/|mu| in
u; each group's a and m are weighted by the inverse square of that, and their weighted means (with a
standard error from the spread of the groups, which does not assume the noise model) estimate the
bias: over every group of every draw, and over the groups of each valid count k, since a wrong
divisor k + delta moves `a` by delta/(2k) and `m` by -delta/k. In float32 Keras's count + 1e-7 is
1 + 2^-23 at k = 1 (m = -2 u there) and rounds to k above.

    flagged  <=>  |estimate| > Z_BIAS standard errors  and  > allowance(k),  over >= MIN_GROUPS groups

The allowance is what honest rounding can do systematically: a constant of a fixed count, fl(1/k),
is off by up to 1 u (0 for k a power of 2), the same in every draw with that count, and the rest
(fl(eps), a square root, roundings that repeat because drawn values have few bits) up to about 1 u:
measured on conforming peers, torch F.instance_norm's mean +0.19 u at 6.6 standard errors (float64),
Keras RMSNormalization's scale at k = 4 +0.42 u at 8.1 (float32, in draws of an earlier version of
this check). Random roundings average out. So at k = 1 a mean off by 1.5 u is a bias, at k = 15 (fl(1/15) is 0.88 u off in
float32) it is not. The
false-alarm and detection figures are in docs/SYSTEMATIC_ERROR.md (examples/systematic_error.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..error import unit_roundoff
from .compare import ReferenceValues

Z_BIAS = 6.0  # standard errors
OTHER_CONSTANTS = 1.0  # u: what fl(eps), a square root and repeated roundings may add systematically
POOLED_ALLOWANCE = 2.0  # u: the largest allowance(k), for the estimate over every group
MIN_GROUPS = 20.0  # effective groups ((sum w)^2 / sum w^2) for a verdict
STATISTICS = (("output scale", 0, 0.5), ("subtracted mean", 2, -1.0))  # name, column, d(estimate)/(delta/k)


@dataclass(frozen=True)
class Estimate:
    """One systematic error's estimate, in u: the relative error of `what` over the groups with
    `count` valid positions (None: every group), `value` with its standard `error`, from `groups`
    effective groups (0 when none could be used); `allowance` is what honest rounding may do
    systematically (u); `per_delta` converts it to the divisor offset delta that would cause it (a
    divisor k + delta)."""

    what: str
    count: Optional[int]
    value: float
    error: float
    groups: float
    per_delta: float
    allowance: float

    @property
    def flagged(self) -> bool:
        """A bias: consistent (Z_BIAS standard errors from 0), beyond honest rounding (allowance)
        and measured on enough groups (MIN_GROUPS)."""
        return self.groups >= MIN_GROUPS and abs(self.value) > max(Z_BIAS * self.error, self.allowance)

    def __str__(self) -> str:
        where = "" if self.count is None else f" at k={self.count}"
        if not self.groups:
            return f"{self.what}{where}: no group"
        return f"{self.what}{where} {self.value:+.3g} u (± {self.error:.2g}, {self.groups:.0f} groups)"

    def to_dict(self) -> dict:
        """The fields, and whether the estimate is flagged, as JSON-ready data (inf as "inf")."""
        data = {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}
        return dict(data, flagged=self.flagged)

    def divisor(self, u: float) -> str:
        """The divisor offset that would give this estimate, as text ("" for the pooled one)."""
        if self.count is None:
            return ""
        return f", as a divisor k {self.value * u * self.count / self.per_delta:+.2g} would"


def allowance(count: Optional[int], correction: int, dtype: torch.dtype) -> float:
    """What honest rounding may do systematically to the mean or scale of groups of `count` valid
    positions, in u of `dtype`: fl(1/count) and fl(1/(count - correction))'s relative error plus
    OTHER_CONSTANTS (POOLED_ALLOWANCE over every group, count None)."""
    if count is None:
        return POOLED_ALLOWANCE
    u = Fraction(unit_roundoff(dtype))
    counts = [n for n in {count, count - correction} if n > 0]
    off = [abs(Fraction(float(torch.tensor(1.0 / n, dtype=torch.float64).to(dtype))) * n - 1) / u for n in counts]
    return float(max(off, default=0)) + OTHER_CONSTANTS


def group_samples(got: np.ndarray, ref: ReferenceValues, x: torch.Tensor, valid: np.ndarray, dims: Sequence[int],
                  correction: int, center: bool) -> np.ndarray:
    """(a, weight of a, m, weight of m, k) of each group as rows, a and m in units of x's dtype's u,
    k its valid count; a group whose `a` or `m` cannot be estimated (no spread, mu = 0, a non-finite
    output, degenerate) has weight 0 there."""
    u = unit_roundoff(x.dtype)
    axes = tuple(dims)
    xv = x.double().numpy()
    ok = valid & np.isfinite(got) & np.isfinite(ref.y) & ~ref.degenerate

    def total(values: np.ndarray) -> np.ndarray:
        return np.where(valid, values, 0.0).sum(axis=axes, keepdims=True).reshape(-1)

    count = total(np.ones_like(xv))
    usable = (total(~ok) == 0) & (count > correction)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d = np.where(ok, got - ref.y, 0.0)
        ys = np.where(ok, ref.y, 0.0)
        k = np.maximum(count, 1.0)
        syy, sdy = total(ys * ys), total(d * ys)
        spread = np.sqrt(syy / np.maximum(k - correction, 1.0))  # sigma / s
        mean_over_s = total(np.where(ok, xv * ref.inv_s - ref.y, 0.0)) / k if center else np.zeros_like(k)
        a = np.where(syy > 0, sdy / np.where(syy > 0, syy, 1.0), 0.0) / u
        w_a = np.where(usable & (spread > 0), (spread / (np.abs(mean_over_s) + spread)) ** 2, 0.0)
        b = total(d) / k
        m = np.where(mean_over_s != 0, -b / np.where(mean_over_s != 0, mean_over_s, 1.0), 0.0) / u
        w_m = np.where(usable & (mean_over_s != 0), (np.abs(mean_over_s) / (np.abs(mean_over_s) + spread)) ** 2, 0.0)
    rows = np.stack([a, w_a, m, w_m, count], axis=1)
    return np.where(np.isfinite(rows).all(axis=1, keepdims=True), rows, np.array([0.0, 0.0, 0.0, 0.0, 0.0]))


def _estimate(
    what: str, count: Optional[int], values: np.ndarray, weights: np.ndarray, per_delta: float, allowed: float
) -> Estimate:
    """The weighted mean of `values`, with the sandwich standard error sqrt(sum w^2 e^2) / sum w (e
    the residuals: the spread of the groups themselves, not the weights' noise model)."""
    total = weights.sum()
    if total <= 0:
        return Estimate(what, count, 0.0, math.inf, 0.0, per_delta, allowed)
    value = float((weights * values).sum() / total)
    error = float(math.sqrt(((weights * (values - value)) ** 2).sum()) / total)
    return Estimate(what, count, value, error, float(total**2 / (weights**2).sum()), per_delta, allowed)


def _z(e: Estimate) -> float:
    """|value| in standard errors (inf for a nonzero value with no spread)."""
    return abs(e.value) / e.error if e.error else (math.inf if e.value else 0.0)


def estimates(samples: List[np.ndarray], center: bool, correction: int, dtype: torch.dtype) -> List[Estimate]:
    """From group_samples' rows of every draw, for the output scale and (when centered) the
    subtracted mean: the estimate over every group, then one per valid count k."""
    rows = np.concatenate(samples) if samples else np.zeros((0, 5))
    found = []
    for what, column, per_delta in STATISTICS[: 2 if center else 1]:
        values, weights = rows[:, column], rows[:, column + 1]
        found.append(_estimate(what, None, values, weights, per_delta, allowance(None, correction, dtype)))
        for k in np.unique(rows[:, 4][weights > 0]).astype(int):
            chosen = rows[:, 4] == k
            found.append(
                _estimate(what, int(k), values[chosen], weights[chosen], per_delta, allowance(int(k), correction, dtype))
            )
    return found


def summary(found: List[Estimate]) -> str:
    """Each statistic's estimate over every group, and its valid count furthest from 0 in standard
    errors (among those measured on MIN_GROUPS groups)."""
    parts = []
    for what, _, _ in STATISTICS:
        pooled = [e for e in found if e.what == what and e.count is None]
        counted = [e for e in found if e.what == what and e.count is not None and e.groups >= MIN_GROUPS]
        if pooled:
            far = max(counted, key=_z, default=None)
            parts.append(str(pooled[0]) + ("" if far is None else f"; {far}"))
    return "; ".join(parts)


def verdict(found: List[Estimate], u: float) -> Optional[str]:
    """Why the estimates show a bias (None when they do not)."""
    flagged = [e for e in found if e.flagged]
    if not flagged:
        return None
    return "systematic error: " + "; ".join(
        f"{e}, {_z(e):.1f} standard errors from 0, beyond the {e.allowance:.2g} u rounding allows{e.divisor(u)}" for e in flagged
    )
