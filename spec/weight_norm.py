"""WeightNorm (Salimans and Kingma, 2016) in sympy, for a generic row length n, and its closed forms.

One output row of n entries v_i, the entries that take part m_i in {0, 1} (0: a pruned weight),
and one scale g per row:

    r = ||v|| = sqrt(sum_i m_i v_i^2),    u_i = v_i / r,    w_p = g m_p u_p        (r > 0)

A zero row (r = 0: every entry that takes part is 0, or none takes part) gives w = 0, and every
derivative of it is taken as 0 (w has no limit at v = 0; the rule is never NaN). Pruned entries
give w_p = 0 and receive no gradient.

The derivatives are taken by sympy from this definition, 1/r is named inv_r, and the result is
rewritten in the arguments (u = v inv_r, sum_m_gw_u = inv_r sum_i m_i gw_i v_i, ...) exactly as
the masked normalization's closed forms are (`masknorm.spec.derivation.closed_form`), and then
confirmed by explicit expansion for n = 1..6 (`expand_size`: the definition written out for
concrete masks, each residual expanded to 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import sympy as sp

from masknorm.spec.derivation import ClosedForm, DerivationError, canonicalizer, closed_form
from masknorm.spec.definitions import concrete_masks, j, l, m, n, p, r, t
from masknorm.spec.expansion import Expansion

v = sp.IndexedBase("v")  # the direction parameter (torch: weight_v, original1)
vdot = sp.IndexedBase("vdot")
grad_w = sp.IndexedBase("gw")  # upstream gradient of w
scale = sp.Symbol("g", real=True)  # one per row (torch: weight_g, original0)
scale_dot = sp.Symbol("gdot", real=True)

# the arguments of the closed forms
delta_pj, m_p, m_j, u_p, u_j, gw_j, vdot_p = sp.symbols("delta_pj m_p m_j u_p u_j gw_j vdot_p")
inv_r = sp.Symbol("inv_r", positive=True)
sum_m_gw_u, sum_m_u_vdot = sp.symbols("sum_m_gw_u sum_m_u_vdot")

# the closed forms as stated (w = g m v / ||m v||: Jacobians, VJP and JVP), which the derivation must reproduce
STATEMENTS = {
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
    return tuple(closed_form(name, lhs, args, raw, rows, STATEMENTS) for name, lhs, args, raw in specs)


EXPANDED_SIZES = tuple(range(1, 7))


def _confirm_mask(mask: tuple[int, ...]) -> int:
    """Every closed form against sympy's derivatives of the definition written out for one 0/1 mask
    (plain symbols v1.., gw1.., vdot1..); each residual must expand to 0. The number checked."""
    size = len(mask)
    vs, gws, vdots = ([sp.Symbol(f"{name}{q}") for q in range(size)] for name in ("v", "gw", "vdot"))
    norm = sp.sqrt(sp.Add(*[mq * vq**2 for mq, vq in zip(mask, vs)]))

    def w(q: int, values=vs, gain: sp.Expr = scale) -> sp.Expr:
        return gain * mask[q] * values[q] / norm.xreplace(dict(zip(vs, values)))

    forms = {f.name: f.expr for f in closed_forms()}
    u = [vq / norm for vq in vs]
    common = {inv_r: 1 / norm}
    total = sp.Add(*[mask[q] * gws[q] * u[q] for q in range(size)])
    along = sp.Add(*[mask[q] * u[q] * vdots[q] for q in range(size)])
    loss = sp.Add(*[gws[q] * w(q) for q in range(size)])
    moving = [w(q, [vq + t * dq for vq, dq in zip(vs, vdots)], scale + t * scale_dot) for q in range(size)]
    pairs = []
    for a in range(size):
        pairs.append((sp.diff(w(a), scale), forms["weight_norm_jacobian_g"].xreplace({m_p: mask[a], u_p: u[a]})))
        pairs.append((sp.diff(loss, vs[a]), forms["weight_norm_vjp_v"].xreplace(
            {**common, gw_j: gws[a], m_j: mask[a], u_j: u[a], sum_m_gw_u: total})))
        pairs.append((sp.diff(moving[a], t).xreplace({t: 0}), forms["weight_norm_jvp"].xreplace(
            {**common, vdot_p: vdots[a], m_p: mask[a], u_p: u[a], sum_m_u_vdot: along})))
        pairs += [(sp.diff(w(a), vs[b]), forms["weight_norm_jacobian_v"].xreplace(
            {**common, delta_pj: int(a == b), m_p: mask[a], m_j: mask[b], u_p: u[a], u_j: u[b]})) for b in range(size)]
    pairs.append((sp.diff(loss, scale), forms["weight_norm_vjp_g"].xreplace({sum_m_gw_u: total})))
    squares = norm**2
    for number, (derived, closed) in enumerate(pairs):
        residual = _modulo_norm(sp.expand(derived - closed), squares)
        if residual != 0:
            raise DerivationError(f"WeightNorm, mask {mask}, identity {number}: residual {residual}")
    return len(pairs)


def _modulo_norm(expr: sp.Expr, squares: sp.Expr) -> sp.Expr:
    """expr with every power squares**(k/2) written R**k (R a new symbol), over a common denominator,
    its numerator reduced modulo R**2 - squares: 0 means expr vanishes wherever R**2 = squares, so at
    R = sqrt(squares). (sympy does not simplify v**2/(v**2)**(3/2) itself for real v.)"""
    root = sp.Dummy("R", positive=True)
    named = expr.replace(lambda e: e.is_Pow and e.base == squares and e.exp.is_Rational,
                         lambda e: root ** (2 * e.exp))
    numerator = sp.numer(sp.together(named))
    return sp.rem(sp.expand(numerator), root**2 - squares, root)


@lru_cache(maxsize=None)
def expand_size(size: int) -> Expansion:
    """Confirm WeightNorm's closed forms for one row length, over `concrete_masks(size)`."""
    masks = tuple(concrete_masks(size))
    return Expansion(size, masks, sum(_confirm_mask(mask) for mask in masks))
