"""WeightNorm's properties, for a generic row length n (sums kept as Sums): the committed closed forms
(spec/weight_norm_forms.py) are the definition's derivatives; w is invariant to the scale of v;
each row of w has norm |g|; the VJP for v is orthogonal to v.

`closed` is the module of closed forms (or a stand-in with its functions), called with its
arguments defined as in `masknorm.spec.weight_norm` (u = v/r, inv_r = 1/r, r = sqrt(sum m v^2)).
"""

from __future__ import annotations

from typing import Callable

import sympy as sp

from masknorm.proofs.derivatives import ClosedForms, call, summed
from masknorm.proofs.residual import Residuals, reduced
from masknorm.spec import weight_norm_forms
from masknorm.spec.definitions import j, m, p, t
from masknorm.spec.weight_norm import DEFINITION, WeightNorm, grad_w, scale, scale_dot, v, vdot

SCALE = sp.Symbol("a", positive=True)


def _arguments() -> dict[str, sp.Expr]:
    """Argument name -> its definition, with r = sqrt(sum_i m_i v_i^2) written out."""
    inv_r = 1 / sp.sqrt(DEFINITION.norm_squared())
    return {
        "delta_pj": sp.KroneckerDelta(p, j), "m_p": m[p], "m_j": m[j], "u_p": v[p] * inv_r, "u_j": v[j] * inv_r,
        "gw_j": grad_w[j], "vdot_p": vdot[p], "g": scale, "gdot": scale_dot, "inv_r": inv_r,
        "sum_m_gw_u": summed(m[p] * grad_w[p] * v[p] * inv_r, p),
        "sum_m_u_vdot": summed(m[p] * v[p] * inv_r * vdot[p], p),
    }


def weight_norm_closed_forms(closed: ClosedForms = weight_norm_forms) -> Residuals:
    """WeightNorm closed forms: the committed Jacobians, VJP (v, g) and JVP are the derivatives of w = g m v/||v||.
    Scope: generic n, any mask of entries that take part, any g, rows with ||v|| > 0."""
    values = _arguments()
    d_v, d_g = sp.diff(DEFINITION.w(p), v[j]), sp.diff(DEFINITION.w(p), scale)
    moving = DEFINITION.w(p, lambda q: v[q] + t * vdot[q], scale + t * scale_dot)
    return reduced(
        d_v - call(closed, "weight_norm_jacobian_v", values),
        d_g - call(closed, "weight_norm_jacobian_g", values),
        summed(grad_w[p] * d_v, p) - call(closed, "weight_norm_vjp_v", values),
        summed(grad_w[p] * d_g, p) - call(closed, "weight_norm_vjp_g", values),
        sp.diff(moving, t).xreplace({t: 0}) - call(closed, "weight_norm_jvp", values),
    )


def weight_norm_scale_invariance(factor: sp.Expr = SCALE) -> Residuals:
    """WeightNorm scale invariance: w(a v, g) = w(v, g) for every a > 0.
    Scope: generic n, any mask of entries that take part, any g, rows with ||v|| > 0."""
    return reduced(DEFINITION.w(p, lambda q: factor * v[q]) - DEFINITION.w(p))


def _squared_scale(gain: sp.Expr) -> sp.Expr:
    return gain**2


def weight_norm_row_norm(definition: WeightNorm = DEFINITION,
                         claimed: Callable[[sp.Expr], sp.Expr] = _squared_scale) -> Residuals:
    """WeightNorm row norm: ||w_row||^2 = sum_p w_p^2 = g^2, so ||w_row|| = |g|.
    Scope: generic n, any mask of entries that take part (pruned entries are 0 in w), any g, rows with ||v|| > 0."""
    return reduced(summed(definition.w(p) ** 2, p) - claimed(scale))


def weight_norm_vjp_orthogonality(closed: ClosedForms = weight_norm_forms) -> Residuals:
    """WeightNorm VJP orthogonality: the committed VJP for v is orthogonal to v, sum_j v_j grad_v_j = 0.
    Scope: generic n, any mask of entries that take part, any g and upstream gradient, rows with ||v|| > 0.

    So a gradient step on v does not change ||v|| to first order.
    """
    return reduced(summed(v[j] * call(closed, "weight_norm_vjp_v", _arguments()), j))
