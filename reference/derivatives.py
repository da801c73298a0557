"""VJP and JVP of masked normalization: the spec's generated closed forms evaluated on mpf values.

    gx_j = (1/s)[g_j p_j - m_j/k sum_P g - m_j yhat_j/nu sum_P g yhat],  yd_p = (1/s)[xd_p - sum_V xd/k - yhat_p/nu sum_V yhat xd]

With eps outside the square root (s = sigma + eps) the same forms hold with nu replaced by
nu sigma/s: d sigma/d x_j = m_j yhat_j s/(nu sigma). At sigma = 0 every m_j yhat_j is 0 and the
term vanishes (the derivative exists there: yhat = (x - mu)/eps + O(|dx|^2)).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import mpmath
import numpy as np

from masknorm.spec import closed_forms as cf

from .convert import object_array, to_float64
from .forward import GroupStats, all_stats, normalized_positions, passed_through, yhat_row
from .groups import sum_to_shape
from .problem import Problem, prepare

ZERO = mpmath.mpf(0)
ONE = mpmath.mpf(1)


def divisor(problem: Problem, stats: GroupStats) -> Any:
    """The nu of the closed forms: nu, or nu sigma/s with eps outside the square root (nu where
    sigma = 0, since the term it divides is 0 there)."""
    if problem.eps_outside and stats.sigma != 0:
        return stats.nu * stats.sigma / stats.s
    return stats.nu


def vjp_mp(
    problem: Problem, grad_out: np.ndarray, per_group: Optional[List[GroupStats]] = None
) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """(grad_x in x's shape, grad_weight in weight's shape, grad_bias in bias's shape) as mpf
    arrays at the current precision (None for an absent weight / bias); `grad_out` is grouped;
    `per_group`: all_stats(problem) when already computed.

    Positions off P are passed through (keep: identity, zero: 0) and left out of every sum; the
    closed forms are called with p_j = 1 on P. A term whose upstream gradient is exactly 0 is
    skipped, not multiplied, so 0 * NaN never reaches a gradient; yhat_j enters the closed form only
    as m_j * yhat_j, so it is passed as 0 where m_j = 0 (a masked-out value is never read)."""
    a = problem.args
    in_p = normalized_positions(problem)
    shape = problem.mask.shape
    gx = np.empty(shape, dtype=object)
    gw = object_array([ZERO] * grad_out.size, shape)
    gb = object_array([ZERO] * grad_out.size, shape)
    for g, stats in enumerate(all_stats(problem) if per_group is None else per_group):
        go, m, p = grad_out[g], problem.mask[g], in_p[g]
        if stats.degenerate:
            gx[g] = [passed_through(go[j], m[j], a.masked) for j in range(len(go))]
            continue
        yhat = yhat_row(problem.x[g], p, stats)
        live = [bool(p[j]) and go[j] != 0 for j in range(len(go))]
        weight = problem.weight[g] if problem.weight is not None else [ONE] * len(go)
        gvec = [weight[j] * go[j] if live[j] else ZERO for j in range(len(go))]
        sum_p_g = mpmath.fsum(gvec[j] for j in range(len(go)) if live[j])
        sum_p_g_yhat = mpmath.fsum(gvec[j] * yhat[j] for j in range(len(go)) if live[j])
        inv_s = 1 / stats.s
        nu = divisor(problem, stats)
        for j in range(len(go)):
            if live[j]:
                gw[g, j] = cf.weight_grad(go[j], yhat[j], ONE)
                gb[g, j] = cf.bias_grad(go[j], ONE)
            if not p[j]:
                gx[g, j] = passed_through(go[j], m[j], a.masked)
                continue
            m_j, y_j = (ONE, yhat[j]) if m[j] else (ZERO, ZERO)
            if a.center:
                gx[g, j] = cf.vjp_centered(gvec[j], ONE, m_j, y_j, sum_p_g, sum_p_g_yhat, stats.k, nu, inv_s)
            else:
                gx[g, j] = cf.vjp_rms(gvec[j], ONE, m_j, y_j, sum_p_g_yhat, nu, inv_s)
    layout = problem.layout

    def reduced(per_position: np.ndarray, shape: Optional[Tuple[int, ...]]) -> Optional[np.ndarray]:
        return None if shape is None else sum_to_shape(layout.from_groups(per_position), shape)

    return layout.from_groups(gx), reduced(gw, problem.weight_shape), reduced(gb, problem.bias_shape)


def jvp_mp(
    problem: Problem, x_dot: np.ndarray, weight_dot: Optional[np.ndarray], bias_dot: Optional[np.ndarray]
) -> np.ndarray:
    """y_dot in x's shape (mpf, current precision) from grouped tangents (None = 0). The sums run
    over V only, so a masked-out tangent reaches only its own output (normalize and keep; zero drops it)."""
    a = problem.args
    in_p = normalized_positions(problem)
    out = np.empty(problem.mask.shape, dtype=object)
    for g, stats in enumerate(all_stats(problem)):
        xd, m, p = x_dot[g], problem.mask[g], in_p[g]
        n = len(xd)
        if stats.degenerate:
            out[g] = [passed_through(xd[j], m[j], a.masked) for j in range(n)]
            continue
        yhat = yhat_row(problem.x[g], p, stats)
        valid = [j for j in range(n) if m[j]]
        sum_v_xdot = mpmath.fsum(xd[j] for j in valid)
        sum_v_yhat_xdot = mpmath.fsum(yhat[j] * xd[j] for j in valid)
        inv_s = 1 / stats.s
        nu = divisor(problem, stats)
        for j in range(n):
            if not p[j]:
                out[g, j] = passed_through(xd[j], m[j], a.masked)
                continue
            if a.center:
                yd = cf.jvp_centered(xd[j], yhat[j], sum_v_xdot, sum_v_yhat_xdot, stats.k, nu, inv_s)
            else:
                yd = cf.jvp_rms(xd[j], yhat[j], sum_v_yhat_xdot, nu, inv_s)
            out[g, j] = cf.affine_jvp(
                ONE if problem.weight is None else problem.weight[g, j],
                yd,
                ZERO if weight_dot is None else weight_dot[g, j],
                yhat[j],
                ZERO if bias_dot is None else bias_dot[g, j],
            )
    return problem.layout.from_groups(out)


def vjp(
    grad_out: Any,
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
) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """(grad_x, grad_weight, grad_bias) = grad_out^T d out/d(x, weight, bias), each rounded once to
    float64; grad_weight = sum_P grad_out * yhat and grad_bias = sum_P grad_out, in weight's / bias's
    shape (None when weight / bias is None); `eps_outside`: s = sigma + eps."""
    problem, extra, _, _ = prepare(
        x, mask, dim, correction=correction, eps=eps, center=center, weight=weight, bias=bias, masked=masked,
        dps=dps, eps_outside=eps_outside, like_x={"grad_out": grad_out},
    )
    with mpmath.workdps(dps):
        grads = vjp_mp(problem, extra["grad_out"])
    gx, gw, gb = (None if g is None else to_float64(g) for g in grads)
    return gx, gw, gb


def jvp(
    x: Any,
    x_dot: Any,
    mask: Any = None,
    dim: Any = -1,
    *,
    weight_dot: Any = None,
    bias_dot: Any = None,
    correction: int = 0,
    eps: float = 1e-5,
    center: bool = True,
    weight: Any = None,
    bias: Any = None,
    masked: str = "normalize",
    dps: int = 50,
    eps_outside: bool = False,
) -> np.ndarray:
    """y_dot = d out/d(x, weight, bias) . (x_dot, weight_dot, bias_dot), rounded once to float64
    (weight_dot / bias_dot None = 0; degenerate groups: y_dot = x_dot, 0 where "zero" applies;
    `eps_outside`: s = sigma + eps)."""
    problem, extra, wd, bd = prepare(
        x, mask, dim, correction=correction, eps=eps, center=center, weight=weight, bias=bias, masked=masked,
        dps=dps, eps_outside=eps_outside, like_x={"x_dot": x_dot}, like_weight=weight_dot, like_bias=bias_dot,
    )
    with mpmath.workdps(dps):
        out = jvp_mp(problem, extra["x_dot"], wd, bd)
    return to_float64(out)
