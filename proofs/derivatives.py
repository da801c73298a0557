"""The committed closed forms (spec/closed_forms.py, plain Python called here on sympy
expressions) against the definition's derivatives, and the algebra of the VJP and JVP they give:
adjointness and orthogonality. Generic group size n, sums kept as Sums.

`closed` is the module of closed forms (any object with its functions); each function is called
with its arguments defined as in `masknorm.spec.derivation.Variant.forward` (k, nu, inv_s = 1/s,
yhat_q = (x_q - mu)/s, p_j = P_j, g_j = the upstream gradient, sums over V and P).
"""

from __future__ import annotations

import inspect
from types import ModuleType, SimpleNamespace
from typing import Callable

import sympy as sp

from masknorm.proofs.residual import Residuals, reduced
from masknorm.spec import closed_forms
from masknorm.spec.definitions import (
    K, P, beta, beta_dot, eps, g, gamma, gamma_dot, grad_out, j, k, m, n, name_scale, nu, p, s, x, xdot,
)
from masknorm.spec.derivation import GENERAL, Variant

ClosedForms = ModuleType | SimpleNamespace  # the closed_forms module, or a stand-in with its functions
SUMMED = sp.Symbol("h", integer=True, positive=True)


def _arguments(variant: Variant, upstream: Callable[[sp.Expr], sp.Expr] = g.__getitem__,
               normalized: sp.IndexedBase = P) -> dict[str, sp.Expr]:
    """Argument name -> its definition (positions p and j, normalized set given by its indicator)."""
    values = {str(symbol): value for symbol, value in variant.forward(normalized.__getitem__, upstream).items()}
    return {**values, "k": k, "nu": nu}


def call(closed: ClosedForms, name: str, values: dict[str, sp.Expr]) -> sp.Expr:
    """The closed form called name, with each argument taken from values by its parameter name."""
    function = getattr(closed, name)
    return function(*[values[argument] for argument in inspect.signature(function).parameters])


def summed(expr: sp.Expr, index: sp.Symbol) -> sp.Expr:
    """Sum of expr over its free position index (renamed to h, bound nowhere in the definitions)."""
    return sp.Sum(expr.xreplace({index: SUMMED}), (SUMMED, 1, n))


def closed_form_derivatives(center: bool = True, closed: ClosedForms = closed_forms) -> Residuals:
    """Closed forms: the committed Jacobian, VJP (x, weight, bias) and JVP are the derivatives of the masked output.
    Scope: generic n, any mask, every policy at once (P_p, K symbolic), centered and RMS, any eps, with weight
    and bias.

    The masked output is out_p = P_p (gamma_p yhat_p + beta_p) + K (1 - P_p) x_p. The VJP and JVP
    are compared with its Jacobians (x, weight, bias) contracted with gout and with the tangents
    (xdot, gammadot, betadot).
    """
    variant = Variant(center)
    norm = variant.norm
    sfx = variant.suffix
    values = _arguments(variant, lambda q: gamma[q] * grad_out[q])
    out = norm.out(p, GENERAL, gamma[p], beta[p])
    d_x, d_weight, d_bias = (name_scale(sp.diff(out, base[j]), norm) for base in (x, gamma, beta))
    jacobian = P[p] * gamma[p] * call(closed, f"jacobian_{sfx}", values) + K * (1 - P[p]) * sp.KroneckerDelta(p, j)
    vjp = call(closed, f"vjp_{sfx}", values) + K * (1 - P[j]) * grad_out[j]
    yhat_dot = call(closed, f"jvp_{sfx}", values)
    jvp = P[p] * call(closed, "affine_jvp", {"weight": gamma[p], "yhat_dot": yhat_dot, "weight_dot": gamma_dot[p],
                                               "yhat": values["yhat_p"], "bias_dot": beta_dot[p]}) \
        + K * (1 - P[p]) * xdot[p]
    tangent = d_x * xdot[j] + d_weight * gamma_dot[j] + d_bias * beta_dot[j]
    return reduced(
        d_x - jacobian,
        summed(grad_out[p] * d_x, p) - vjp,
        summed(grad_out[p] * d_weight, p) - call(closed, "weight_grad", values),
        summed(grad_out[p] * d_bias, p) - call(closed, "bias_grad", values),
        summed(tangent, j) - jvp,
    )


def adjointness(center: bool = True, closed: ClosedForms = closed_forms) -> Residuals:
    """JVP/VJP adjointness: <v, J u> = <J^T v, u>, J u the JVP and J^T v the VJP closed forms (v paired on P).
    Scope: generic n, any mask, any normalized set P (every policy), centered and RMS, any eps.

    u = xdot is the tangent, v = g the cotangent of yhat.
    """
    variant = Variant(center)
    values = _arguments(variant)
    tangent_side = summed(P[p] * g[p] * call(closed, f"jvp_{variant.suffix}", values), p)
    cotangent_side = summed(call(closed, f"vjp_{variant.suffix}", values) * xdot[j], j)
    return reduced(tangent_side - cotangent_side)


def _everywhere(q: sp.Expr) -> sp.Expr:
    return sp.S.One


def gradient_orthogonality(center: bool = True, closed: ClosedForms = closed_forms,
                           weight: Callable[[sp.Expr], sp.Expr] = _everywhere,
                           epsilon: sp.Expr = sp.S.Zero) -> Residuals:
    """Gradient orthogonality (eps = 0): the VJP is orthogonal to the ones (centered) and to yhat; 0 off V if P in V.
    Scope: generic n, any mask, any normalized set P (every policy), centered (ones) and RMS (yhat), eps = 0.

    When P is within V (keep, zero) these are the valid-ones vector and yhat on V.
    weight(q) = 1 pairs over all positions. Under "normalize" (P = all) the VJP is not orthogonal
    to the valid-ones vector: its masked-out entries are g_j/s. The support part holds for any eps.
    """
    variant = Variant(center)
    scale = {s: sp.sqrt(variant.norm.base.xreplace({eps: epsilon}))}
    values = {name: value.xreplace(scale) for name, value in _arguments(variant).items()}
    grad_x = call(closed, f"vjp_{variant.suffix}", values)
    ones = (summed(weight(j) * grad_x, j),) if center else ()
    within_valid = (1 - m[j]) * call(closed, f"vjp_{variant.suffix}", _arguments(variant, normalized=m))
    return reduced(*ones, summed(weight(j) * values["yhat_j"] * grad_x, j), within_valid)
