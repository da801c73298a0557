"""The definition of masked normalization evaluated directly in mpmath, group by group.

    mu = (1/k) sum_V x (RMS: 0),  s = sqrt((1/nu) sum_V (x - mu)^2 + eps),  out = gamma (x - mu)/s + beta
    (eps_outside: s = sigma + eps, sigma = sqrt((1/nu) sum_V (x - mu)^2))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import mpmath
import numpy as np

from .convert import object_array, to_float64
from .problem import Problem, prepare


@dataclass(frozen=True)
class GroupStats:
    """Statistics of one group: k valid positions, nu = k - c; mu, sigma and s = sqrt(sigma^2 + eps)
    are None when the group is degenerate."""

    k: int
    nu: int
    mu: Optional[mpmath.mpf] = None
    sigma: Optional[mpmath.mpf] = None
    s: Optional[mpmath.mpf] = None

    @property
    def degenerate(self) -> bool:
        """nu <= 0, or eps = 0 and the valid values all equal (RMS: all zero): out = x."""
        return self.s is None


def group_stats(
    x: Sequence[Any], valid: Sequence[bool], correction: int, eps: mpmath.mpf, center: bool, eps_outside: bool = False
) -> GroupStats:
    """mu and s of one group from its valid values only, at the current mpmath precision; the
    degenerate test compares the exact values (never a rounded variance). s = sqrt(sigma^2 + eps),
    or sigma + eps with `eps_outside`."""
    values = [v for v, m in zip(x, valid) if m]
    k = len(values)
    nu = k - correction
    if nu <= 0:
        return GroupStats(k, nu)
    if eps == 0 and all(v == (values[0] if center else 0) for v in values):
        return GroupStats(k, nu)
    mu = mpmath.fsum(values) / k if center else mpmath.mpf(0)
    variance = mpmath.fsum((v - mu) ** 2 for v in values) / nu
    sigma = mpmath.sqrt(variance)
    return GroupStats(k, nu, mu, sigma, sigma + eps if eps_outside else mpmath.sqrt(variance + eps))


def all_stats(problem: Problem) -> List[GroupStats]:
    """group_stats of every row of the problem."""
    a = problem.args
    return [
        group_stats(xr, mr, a.correction, problem.eps, a.center, problem.eps_outside)
        for xr, mr in zip(problem.x, problem.mask)
    ]


def normalized_positions(problem: Problem) -> np.ndarray:
    """P as a (groups, n) bool matrix: every position under "normalize", the valid ones otherwise."""
    if problem.args.masked == "normalize":
        return np.ones(problem.mask.shape, bool)
    return problem.mask


def passed_through(value: Any, valid: bool, masked: str) -> Any:
    """Output (or derivative) at a position not normalized with the group's statistics: the value
    itself (degenerate group, or "keep"), 0 at a masked-out position under "zero"."""
    return mpmath.mpf(0) if masked == "zero" and not valid else value


def yhat_row(x: Sequence[Any], in_p: Sequence[bool], stats: GroupStats) -> List[Any]:
    """yhat_j = (x_j - mu)/s on P of a non-degenerate group; None elsewhere (never computed)."""
    return [(v - stats.mu) / stats.s if p else None for v, p in zip(x, in_p)]


def normalize_mp(problem: Problem, per_group: Optional[List[GroupStats]] = None) -> np.ndarray:
    """The outputs in x's shape, an object array of mpf at the current precision (not rounded);
    `per_group`: all_stats(problem) when already computed."""
    masked = problem.args.masked
    in_p = normalized_positions(problem)
    rows = []
    for g, stats in enumerate(all_stats(problem) if per_group is None else per_group):
        x, m = problem.x[g], problem.mask[g]
        if stats.degenerate:
            rows.append([passed_through(x[j], m[j], masked) for j in range(len(x))])
            continue
        yhat = yhat_row(x, in_p[g], stats)
        row = []
        for j, y in enumerate(yhat):
            if y is None:
                row.append(passed_through(x[j], m[j], masked))
                continue
            if problem.weight is not None:
                y = problem.weight[g, j] * y
            if problem.bias is not None:
                y = y + problem.bias[g, j]
            row.append(y)
        rows.append(row)
    return problem.layout.from_groups(object_array([v for row in rows for v in row], problem.mask.shape))


def masked_norm(
    x: Any,
    mask: Any = None,
    dim: Any = -1,
    *,
    correction: int = 0,
    eps: float = 1e-5,
    center: bool = True,
    weight: Any = None,
    bias: Any = None,
    masked: str = "normalize",
    dps: int = 50,
    eps_outside: bool = False,
) -> np.ndarray:
    """masked_norm evaluated at `dps` digits on the exact input values, rounded once to float64:
    out = gamma (x - mu)/s + beta on P, x (keep) or 0 (zero) off P, x on degenerate groups
    (`eps_outside`: s = sigma + eps)."""
    problem, _, _, _ = prepare(
        x, mask, dim, correction=correction, eps=eps, center=center, weight=weight, bias=bias, masked=masked, dps=dps,
        eps_outside=eps_outside,
    )
    with mpmath.workdps(dps):
        out = normalize_mp(problem)
    return to_float64(out)
