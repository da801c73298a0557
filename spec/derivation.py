"""Derive the closed forms of CONTRACT.md from the definition, for a generic group size n.

Each derivative is taken by sympy from `definitions` (sums kept as Sums over 1..n), sqrt(var + eps)
is named s, and the result is brought to canonical form (`canonical`). It is then rewritten in the
closed form's arguments by inverting their definitions (x_p = mu + s yhat_p, Sum(m x) = k mu,
Sum(P g x) = s sum_p_g_yhat + mu sum_p_g, ...) and collected. Each closed form is checked
forward: its arguments replaced by their definitions, it equals the derivative (canonical residual
0); and it equals CONTRACT.md's statement. `policy_checks` then confirms, per policy, the full
output's Jacobian, VJP (x, weight, bias) and JVP as combinations of the closed forms.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Protocol

import sympy as sp

from masknorm.spec import arguments as a
from masknorm.spec.canonical import Canonicalizer, Enumeration
from masknorm.spec.definitions import (
    INDICATORS, POLICIES, GenericGroup, K, Normalization, P, Policy, beta, beta_dot, degenerate_out, g, gamma,
    gamma_dot, grad_out, i, j, k, l, m, n, name_scale, normalization, nu, p, pi, r, s, sigma, t, x, xdot,
)

GROUP = GenericGroup()
GENERAL = Policy("general", P.__getitem__, K)


class DerivationError(AssertionError):
    """A derived expression did not reduce to, or did not equal, its closed form."""


@dataclass(frozen=True)
class ClosedForm:
    """name(args) = expr, derived from `derivative` (canonical form, in definition symbols)."""

    name: str
    lhs: str
    args: tuple[sp.Symbol, ...]
    expr: sp.Expr
    derivative: sp.Expr
    design: sp.Expr | None


@lru_cache(maxsize=1)
def canonicalizer() -> Canonicalizer:
    """The canonicalizer for the definitions: m and P are 0/1, Sum(m_i) = k; pi permutes 1..n and
    sigma enumerates the k valid positions."""
    enumerations = (Enumeration(pi, n, n, lambda q: sp.S.One), Enumeration(sigma, k, n, m.__getitem__))
    return Canonicalizer(INDICATORS, {GROUP.valid_sum(lambda q: sp.S.One, i): k}, enumerations)


@dataclass(frozen=True)
class Variant:
    """Centered or RMS normalization of the generic group, with the maps between symbol sets."""

    center: bool

    @property
    def suffix(self) -> str:
        return "centered" if self.center else "rms"

    @property
    def norm(self) -> Normalization:
        return normalization(GROUP, self.center)

    def moving(self) -> Normalization:
        """The statistics of x + t xdot (a directional derivative at t = 0 gives the JVP)."""
        return normalization(GROUP, self.center, lambda q: x[q] + t * xdot[q])

    def named(self, expr: sp.Expr) -> sp.Expr:
        """expr (a derivative of the definition) with sqrt(var + eps) named s."""
        return name_scale(expr, self.norm)

    def yhat(self, q: sp.Expr) -> sp.Expr:
        """yhat_q with the scale named: (x_q - mu)/s."""
        return (x[q] - self.norm.mu) / s

    def inverse(self) -> dict[sp.Expr, sp.Expr]:
        """Canonical atoms -> arguments: x_q = mu + s yhat_q, Sum(m x) = k mu, Sum(m xdot) = sum_v_xdot, ..."""
        canon = canonicalizer()
        mean = a.mu if self.center else sp.S.Zero
        inverse = {
            x[p]: mean + s * a.yhat_p, x[j]: mean + s * a.yhat_j, m[j]: a.m_j, P[j]: a.p_j, g[j]: a.g_j,
            xdot[p]: a.xdot_p, grad_out[j]: a.grad_out_j, sp.KroneckerDelta(p, j): a.delta_pj,
            canon(GROUP.valid_sum(xdot.__getitem__, i)): a.sum_v_xdot,
            canon(GROUP.valid_sum(lambda q: x[q] * xdot[q], i)): s * a.sum_v_yhat_xdot + mean * a.sum_v_xdot,
            canon(GROUP.sum(lambda q: P[q] * g[q], r)): a.sum_p_g,
            canon(GROUP.sum(lambda q: P[q] * g[q] * x[q], r)): s * a.sum_p_g_yhat + mean * a.sum_p_g,
        }
        if self.center:
            inverse[canon(GROUP.valid_sum(x.__getitem__, i))] = k * a.mu
        return inverse

    def forward(self, normalized: Callable[[sp.Expr], sp.Expr] = P.__getitem__,
                upstream: Callable[[sp.Expr], sp.Expr] = g.__getitem__) -> dict[sp.Symbol, sp.Expr]:
        """Arguments -> their definitions (P and g as given: p_j = normalized(j), g_j = upstream(j))."""
        return {
            a.delta_pj: sp.KroneckerDelta(p, j), a.m_j: m[j], a.p_j: normalized(j), a.inv_s: 1 / s,
            a.yhat_p: self.yhat(p), a.yhat_j: self.yhat(j), a.xdot_p: xdot[p], a.g_j: upstream(j),
            a.grad_out_j: grad_out[j],
            a.sum_v_xdot: GROUP.valid_sum(xdot.__getitem__, l),
            a.sum_v_yhat_xdot: GROUP.valid_sum(lambda q: self.yhat(q) * xdot[q], l),
            a.sum_p_g: GROUP.sum(lambda q: normalized(q) * upstream(q), r),
            a.sum_p_g_yhat: GROUP.sum(lambda q: normalized(q) * upstream(q) * self.yhat(q), r),
        }


class Rewriting(Protocol):
    """What turns a derivative into a closed form: name its radical (`named`), map canonical atoms to
    arguments (`inverse`) and arguments to their definitions (`forward`)."""

    def named(self, expr: sp.Expr) -> sp.Expr: ...

    def inverse(self) -> dict[sp.Expr, sp.Expr]: ...

    def forward(self) -> dict[sp.Symbol, sp.Expr]: ...


def _rewrite(derivative: sp.Expr, variant: Rewriting, args: tuple[sp.Symbol, ...], name: str) -> sp.Expr:
    """Express a canonical derivative in args (inverse map, s = 1/inv_s) and collect it."""
    rewritten = sp.expand(derivative.xreplace(variant.inverse()).xreplace({s: 1 / a.inv_s}))
    closed = sp.factor_terms(rewritten)
    leftover = closed.free_symbols - set(args)
    if leftover:
        left = sorted(map(str, leftover))
        raise DerivationError(f"{name}: the derivative does not reduce to its arguments (left: {left})")
    return closed


def _confirm(name: str, closed: sp.Expr, derivative: sp.Expr, variant: Rewriting) -> None:
    """Forward check: closed with its arguments defined equals the derivative."""
    residual = canonicalizer()(closed.xreplace(variant.forward()) - derivative)
    if residual != 0:
        raise DerivationError(f"{name}: closed form differs from the derivative by {residual}")


def closed_form(name: str, lhs: str, args: tuple[sp.Symbol, ...], raw: sp.Expr, variant: Rewriting,
                designs: dict[str, sp.Expr] | None = None) -> ClosedForm:
    """The closed form of the derivative raw: named, canonical, rewritten in args, forward-checked and
    compared with its statement in designs (default: CONTRACT.md's, `arguments.CONTRACT`), when it has one."""
    designs = a.CONTRACT if designs is None else designs
    derivative = canonicalizer()(variant.named(raw))
    closed = _rewrite(derivative, variant, args, name)
    _confirm(name, closed, derivative, variant)
    design = designs.get(name)
    if design is not None and sp.expand(closed - design) != 0:
        raise DerivationError(f"{name}: derived {closed} differs from its statement {design}")
    return ClosedForm(name, lhs, args, closed, derivative, design)


def _normalization_forms(variant: Variant) -> list[ClosedForm]:
    """Jacobian d yhat_p/d x_j, JVP d/dt yhat_p(x + t xdot), VJP d/dx_j sum_q P_q g_q yhat_q."""
    norm, sfx, centered = variant.norm, variant.suffix, variant.center
    moving = variant.moving()
    jacobian_args = (a.delta_pj, a.m_j, a.yhat_p, a.yhat_j) + ((k,) if centered else ()) + (nu, a.inv_s)
    jvp_args = (a.xdot_p, a.yhat_p) + ((a.sum_v_xdot,) if centered else ()) + (a.sum_v_yhat_xdot,) \
        + ((k,) if centered else ()) + (nu, a.inv_s)
    vjp_args = (a.g_j, a.p_j, a.m_j, a.yhat_j) + ((a.sum_p_g,) if centered else ()) + (a.sum_p_g_yhat,) \
        + ((k,) if centered else ()) + (nu, a.inv_s)
    return [
        closed_form(f"jacobian_{sfx}", "d yhat_p / d x_j", jacobian_args, sp.diff(norm.yhat(p), x[j]), variant),
        closed_form(f"jvp_{sfx}", "yhat_dot_p", jvp_args,
                     sp.diff(moving.yhat(p), t).xreplace({t: 0}), variant),
        closed_form(f"vjp_{sfx}", "grad x_j", vjp_args,
                     sp.diff(GROUP.sum(lambda q: P[q] * g[q] * norm.yhat(q), r), x[j]), variant),
    ]


def _affine_forms() -> list[ClosedForm]:
    """Weight/bias gradients of sum_q gout_q out_q, and d/dt of (w + t wdot) Y(t) + b + t bdot."""
    variant = Variant(True)
    norm = variant.norm
    loss = GROUP.sum(lambda q: grad_out[q] * norm.out(q, GENERAL, gamma[q], beta[q]), r)
    forms = [
        closed_form("weight_grad", "grad weight_j", (a.grad_out_j, a.yhat_j, a.p_j), sp.diff(loss, gamma[j]), variant),
        closed_form("bias_grad", "grad bias_j", (a.grad_out_j, a.p_j), sp.diff(loss, beta[j]), variant),
    ]
    curve = sp.Function("Y")(t)  # yhat along the tangent: Y(0) = yhat, Y'(0) = yhat_dot
    derivative = sp.diff((a.weight + t * a.weight_dot) * curve + sp.Symbol("bias") + t * a.bias_dot, t).subs(t, 0)
    closed = derivative.subs({sp.Subs(sp.Derivative(curve, t), t, 0): a.yhat_dot, curve.subs(t, 0): a.yhat})
    args = (a.weight, a.yhat_dot, a.weight_dot, a.yhat, a.bias_dot)
    if closed.free_symbols - set(args) or sp.expand(closed - a.CONTRACT["affine_jvp"]) != 0:
        raise DerivationError(f"affine_jvp: derived {closed} differs from {a.CONTRACT['affine_jvp']}")
    forms.append(ClosedForm("affine_jvp", "out_dot", args, closed, derivative, a.CONTRACT["affine_jvp"]))
    return forms


@lru_cache(maxsize=1)
def closed_forms() -> tuple[ClosedForm, ...]:
    """Every closed form, derived and confirmed generically, in a fixed order."""
    forms = _normalization_forms(Variant(True)) + _normalization_forms(Variant(False)) + _affine_forms()
    return tuple(forms)


def form(name: str) -> ClosedForm:
    """The closed form called name."""
    return next(f for f in closed_forms() if f.name == name)


def _instantiate(name: str, values: dict[sp.Symbol, sp.Expr]) -> sp.Expr:
    return form(name).expr.xreplace(values)


def _require_zero(label: str, residual: sp.Expr) -> str:
    reduced = canonicalizer()(residual)
    if reduced != 0:
        raise DerivationError(f"{label}: residual {reduced}")
    return label


def _weighted_grad_out(q: sp.Expr) -> sp.Expr:
    """g_q = gamma_q gout_q: the upstream gradient of yhat_q through the affine."""
    return gamma[q] * grad_out[q]


def policy_checks(variant: Variant, policy: Policy) -> list[str]:
    """Full output out_p = P_p (gamma_p yhat_p + beta_p) + K (1 - P_p) x_p under policy, generic n:
    its Jacobian, VJP (x, weight, bias) and JVP equal the closed forms combined. Returns the labels."""
    norm, moving, sfx = variant.norm, variant.moving(), variant.suffix
    on = policy.normalized
    forward = variant.forward(on, _weighted_grad_out)
    label = f"{policy.name}, {sfx} (P_q = {on(sp.Symbol('q'))}, K = {policy.keep}):"

    jacobian = on(p) * gamma[p] * _instantiate(f"jacobian_{sfx}", forward) \
        + policy.keep * (1 - on(p)) * sp.KroneckerDelta(p, j)
    raw_jacobian = name_scale(sp.diff(norm.out(p, policy, gamma[p], beta[p]), x[j]), norm)

    loss = GROUP.sum(lambda q: grad_out[q] * norm.out(q, policy, gamma[q], beta[q]), r)
    grad_x = _instantiate(f"vjp_{sfx}", forward) + policy.keep * (1 - on(j)) * grad_out[j]
    grad_weight = _instantiate("weight_grad", forward)
    grad_bias = _instantiate("bias_grad", forward)

    out_t = moving.out(p, policy, gamma[p] + t * gamma_dot[p], beta[p] + t * beta_dot[p])
    affine = {a.weight: gamma[p], a.yhat_dot: _instantiate(f"jvp_{sfx}", forward), a.weight_dot: gamma_dot[p],
              a.yhat: variant.yhat(p), a.bias_dot: beta_dot[p]}
    out_dot = on(p) * _instantiate("affine_jvp", affine) + policy.keep * (1 - on(p)) * xdot[p]
    return [
        _require_zero(f"{label} d out_p/d x_j = P_p gamma_p jacobian + K (1 - P_p) delta_pj", jacobian - raw_jacobian),
        _require_zero(f"{label} grad x_j = vjp(g = gamma gout) + K (1 - P_j) gout_j",
                      grad_x - name_scale(sp.diff(loss, x[j]), norm)),
        _require_zero(f"{label} grad weight_j = weight_grad", grad_weight - name_scale(sp.diff(loss, gamma[j]), norm)),
        _require_zero(f"{label} grad bias_j = bias_grad", grad_bias - sp.diff(loss, beta[j])),
        _require_zero(f"{label} out_dot_p = P_p affine_jvp(jvp) + K (1 - P_p) xdot_p",
                      out_dot - name_scale(sp.diff(out_t, t).xreplace({t: 0}), norm)),
    ]


def degenerate_checks() -> list[str]:
    """Degenerate group (pass-through): d out_p/d x_j = delta_pj (0 for masked-out p under "zero"),
    no weight or bias gradient."""
    labels = []
    for policy in POLICIES:
        zero = policy.name == "zero"
        out = degenerate_out(x[p], m[p], zero)
        loss = GROUP.sum(lambda q: grad_out[q] * degenerate_out(x[q], m[q], zero), r)
        expected = sp.KroneckerDelta(p, j) * (m[p] if zero else 1)
        labels += [
            _require_zero(f"degenerate, {policy.name}: d out_p/d x_j = {expected}", sp.diff(out, x[j]) - expected),
            _require_zero(f"degenerate, {policy.name}: grad x_j = {grad_out[j] * expected.subs(p, j)}",
                          sp.diff(loss, x[j]) - grad_out[j] * expected.subs(p, j)),
            _require_zero(f"degenerate, {policy.name}: grad weight = grad bias = 0",
                          sp.diff(loss, gamma[j]) + sp.diff(loss, beta[j])),
        ]
    return labels


@lru_cache(maxsize=1)
def generic_checks() -> tuple[str, ...]:
    """Every per-policy and degenerate statement, checked for generic n; their labels."""
    labels: list[str] = []
    for center in (True, False):
        for policy in POLICIES:
            labels += policy_checks(Variant(center), policy)
    return tuple(labels + degenerate_checks())

