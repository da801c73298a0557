"""WeightNorm (Salimans and Kingma, 2016) in sympy, for a generic row length n, and its closed forms.

One output row of n entries v_i, the entries that take part m_i in {0, 1} (0: a pruned weight),
and one scale g per row:

    r = ||v|| = sqrt(sum_i m_i v_i^2),    u_i = v_i / r,    w_p = g m_p u_p        (r > 0)

A zero row (r = 0: every entry that takes part is 0, or none takes part) gives w = 0, and every
derivative of it is taken as 0 (w has no limit at v = 0; the rule is never NaN). Pruned entries
give w_p = 0 and receive no gradient.

The derivatives are taken by sympy from this definition, 1/r is named inv_r, and the result is
rewritten in the arguments (u = v inv_r, sum_m_gw_u = inv_r sum_i m_i gw_i v_i, ...) exactly as
the masked normalization's closed forms are (`masknorm.spec.derivation.closed_form`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import sympy as sp

from masknorm.spec.derivation import ClosedForm, canonicalizer, closed_form
from masknorm.spec.definitions import j, l, m, n, p, r, t

v = sp.IndexedBase("v")  # the direction parameter (torch: weight_v, original1)
vdot = sp.IndexedBase("vdot")
grad_w = sp.IndexedBase("gw")  # upstream gradient of w
scale = sp.Symbol("g", real=True)  # one per row (torch: weight_g, original0)
scale_dot = sp.Symbol("gdot", real=True)

# the arguments of the closed forms
delta_pj, m_p, m_j, u_p, u_j, gw_j, vdot_p = sp.symbols("delta_pj m_p m_j u_p u_j gw_j vdot_p")
inv_r = sp.Symbol("inv_r", positive=True)
sum_m_gw_u, sum_m_u_vdot = sp.symbols("sum_m_gw_u sum_m_u_vdot")

# the statements of issue 16, transcribed
DESIGN = {
    "weight_norm_jacobian_v": scale * inv_r * m_p * (delta_pj - m_j * u_p * u_j),
    "weight_norm_jacobian_g": m_p * u_p,
    "weight_norm_vjp_v": scale * inv_r * m_j * (gw_j - u_j * sum_m_gw_u),
    "weight_norm_vjp_g": sum_m_gw_u,
    "weight_norm_jvp": scale * inv_r * m_p * (vdot_p - u_p * sum_m_u_vdot) + scale_dot * m_p * u_p,
}


def _mask(q: sp.Expr) -> sp.Expr:
    return m[q]


@dataclass(frozen=True)
class WeightNorm:
    """The definition; counted(q) says which entries enter the norm (m_q, the entries that take part)."""

    counted: Callable[[sp.Expr], sp.Expr] = _mask

    def norm_squared(self, values: Callable[[sp.Expr], sp.Expr] = v.__getitem__) -> sp.Expr:
        """r^2 = sum_i counted_i values_i^2."""
        return sp.Sum(self.counted(l) * values(l) ** 2, (l, 1, n))

    def w(self, q: sp.Expr, values: Callable[[sp.Expr], sp.Expr] = v.__getitem__, gain: sp.Expr = scale) -> sp.Expr:
        """w_q = gain m_q values_q / sqrt(r^2)."""
        return gain * m[q] * values(q) / sp.sqrt(self.norm_squared(values))


DEFINITION = WeightNorm()


def _sum_m(f: Callable[[sp.Expr], sp.Expr]) -> sp.Expr:
    return sp.Sum(m[r] * f(r), (r, 1, n))


class Rows:
    """The rewriting of weight-norm derivatives (`masknorm.spec.derivation.Rewriting`): 1/r -> inv_r."""

    def named(self, expr: sp.Expr) -> sp.Expr:
        return expr.xreplace({DEFINITION.norm_squared(): 1 / inv_r**2})

    def inverse(self) -> dict[sp.Expr, sp.Expr]:
        canon = canonicalizer()
        return {
            v[p]: u_p / inv_r, v[j]: u_j / inv_r, m[p]: m_p, m[j]: m_j, grad_w[j]: gw_j, vdot[p]: vdot_p,
            sp.KroneckerDelta(p, j): delta_pj,
            canon(_sum_m(lambda q: grad_w[q] * v[q])): sum_m_gw_u / inv_r,
            canon(_sum_m(lambda q: v[q] * vdot[q])): sum_m_u_vdot / inv_r,
        }

    def forward(self) -> dict[sp.Symbol, sp.Expr]:
        return {
            delta_pj: sp.KroneckerDelta(p, j), m_p: m[p], m_j: m[j], u_p: v[p] * inv_r, u_j: v[j] * inv_r,
            gw_j: grad_w[j], vdot_p: vdot[p],
            sum_m_gw_u: inv_r * _sum_m(lambda q: grad_w[q] * v[q]),
            sum_m_u_vdot: inv_r * _sum_m(lambda q: v[q] * vdot[q]),
        }


@lru_cache(maxsize=1)
def closed_forms() -> tuple[ClosedForm, ...]:
    """d w_p/d v_j, d w_p/d g, the VJP for v and g of sum_q gw_q w_q, and the JVP along (vdot, gdot)."""
    rows = Rows()
    loss = sp.Sum(grad_w[r] * DEFINITION.w(r), (r, 1, n))
    moving = DEFINITION.w(p, lambda q: v[q] + t * vdot[q], scale + t * scale_dot)
    specs = [
        ("weight_norm_jacobian_v", "d w_p / d v_j", (delta_pj, m_p, m_j, u_p, u_j, scale, inv_r),
         sp.diff(DEFINITION.w(p), v[j])),
        ("weight_norm_jacobian_g", "d w_p / d g", (m_p, u_p), sp.diff(DEFINITION.w(p), scale)),
        ("weight_norm_vjp_v", "grad v_j", (gw_j, m_j, u_j, sum_m_gw_u, scale, inv_r), sp.diff(loss, v[j])),
        ("weight_norm_vjp_g", "grad g", (sum_m_gw_u,), sp.diff(loss, scale)),
        ("weight_norm_jvp", "w_dot_p", (vdot_p, m_p, u_p, sum_m_u_vdot, scale, scale_dot, inv_r),
         sp.diff(moving, t).xreplace({t: 0})),
    ]
    return tuple(closed_form(name, lhs, args, raw, rows, DESIGN) for name, lhs, args, raw in specs)
