"""Statements about the values a normalization produces: their moments, normalizing them again,
and the degenerate groups that produce none. Generic group size n, sums kept as Sums."""

from __future__ import annotations

from typing import Callable

import sympy as sp

from masknorm.proofs.residual import Residuals, reduced
from masknorm.spec.definitions import (
    POLICIES, GenericGroup, Normalization, degenerate_out, eps, i, k, l, m, normalization, nu, p, r, x,
)
from masknorm.spec.derivation import GROUP

CONSTANT = sp.Symbol("C", real=True)


def _valid(q: sp.Expr) -> sp.Expr:
    return m[q]


def _sum_of_squares(norm: Normalization) -> sp.Expr:
    return nu * norm.var / norm.base


def output_moments(center: bool = True, weight: Callable[[sp.Expr], sp.Expr] = _valid,
                   claimed_squares: Callable[[Normalization], sp.Expr] = _sum_of_squares) -> Residuals:
    """Output moments: sum_V yhat = 0 (centered) and sum_V yhat^2 = nu var/(var + eps).
    Scope: generic n, any mask, centered (both) and RMS (the second), any eps.

    weight(q) = m_q restricts the sums to V; claimed_squares is the stated value of the second.
    """
    norm = normalization(GROUP, center)
    squares = GROUP.sum(lambda q: weight(q) * norm.yhat(q) ** 2, r) - claimed_squares(norm)
    first = (GROUP.sum(lambda q: weight(q) * norm.yhat(q), r),) if center else ()
    return reduced(*first, squares)


def idempotence(center: bool = True, second_eps: sp.Expr = sp.S.Zero, second_nu: sp.Expr = nu) -> Residuals:
    """Idempotence: with eps = 0, normalizing yhat again (same mask and correction) returns yhat.
    Scope: generic n, any mask, any correction c (c = 0 included), centered and RMS, eps = 0.

    second_eps and second_nu are the eps and nu = k - c of the second pass.
    """
    def first(q: sp.Expr) -> sp.Expr:
        return normalization(GROUP, center).yhat(q).xreplace({eps: 0})

    again = normalization(GenericGroup(nu=second_nu), center, first).yhat(p).xreplace({eps: second_eps})
    return reduced(again - first(p))


def _spread(norm: Normalization) -> sp.Expr:
    return (2 * k * nu if norm.center else nu) * norm.var


def _constant_on_valid(q: sp.Expr) -> sp.Expr:
    return m[q] * CONSTANT + (1 - m[q]) * x[q]


def degenerate_passthrough(center: bool = True,
                           claimed_spread: Callable[[Normalization], sp.Expr] = _spread) -> Residuals:
    """Constant passthrough: at eps = 0, s = 0 iff the valid values are all equal (RMS: all 0); then out = x.
    Scope: generic n, any mask, centered and RMS, eps = 0.

    Residuals: the spread identities sum_{i,l in V} (x_i - x_l)^2 = 2 k nu var (centered) and
    sum_V x_i^2 = nu var (RMS), which give var = 0 iff the valid values are all equal (all 0), as
    sums of real squares with k, nu > 0; s^2 = 0 for constant valid values (RMS: zero ones);
    out = x (`degenerate_out`) at every position but masked-out ones under "zero".
    """
    norm = normalization(GROUP, center)
    if center:
        spread = GROUP.sum(lambda q: GROUP.valid_sum(lambda t: m[q] * (x[q] - x[t]) ** 2, l), i)
    else:
        spread = GROUP.valid_sum(lambda q: x[q] ** 2, i)
    constant = normalization(GROUP, center, _constant_on_valid if center else lambda q: (1 - m[q]) * x[q])
    passthrough = [degenerate_out(x[p], 1, policy.name == "zero") - x[p] for policy in POLICIES]
    passthrough += [degenerate_out(x[p], 0, False) - x[p]]
    return reduced(spread - claimed_spread(norm), constant.base.xreplace({eps: 0}), *passthrough)
