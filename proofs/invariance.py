"""Invariances of the normalized values yhat: shift (centered), scale, and padding (masked-out
inputs never reach other positions). Generic group size n, sums kept as Sums.

Valid outputs are out_p = gamma_p yhat_p + beta_p under every policy, so what holds for yhat_p at
valid p holds for them.
"""

from __future__ import annotations

from typing import Callable

import sympy as sp

from masknorm.proofs.residual import Residuals, reduced
from masknorm.spec.definitions import Normalization, eps, j, m, normalization, p, x
from masknorm.spec.derivation import GROUP

SHIFT = sp.Symbol("b", real=True)
SCALE = sp.Symbol("a", positive=True)
MOVE = sp.IndexedBase("z")  # arbitrary new values of the moved positions


def _yhat(norm: Normalization, q: sp.Expr) -> sp.Expr:
    return norm.yhat(q)


def shift_invariance(center: bool = True,
                     claimed: Callable[[Normalization, sp.Expr], sp.Expr] = _yhat) -> Residuals:
    """Shift invariance: yhat_p(x + b) = yhat_p(x) at every position p.
    Scope: generic n, any mask, centered, any eps."""
    shifted = normalization(GROUP, center, lambda q: x[q] + SHIFT)
    return reduced(shifted.yhat(p) - claimed(normalization(GROUP, center), p))


def _scaled_eps(scale: sp.Expr) -> sp.Expr:
    return eps / scale**2


def scale_invariance(center: bool = True, scale: sp.Expr = SCALE,
                     claimed_eps: Callable[[sp.Expr], sp.Expr] = _scaled_eps) -> Residuals:
    """Scale invariance: yhat_eps(a x) = yhat_{eps/a^2}(x) for a > 0, so yhat(a x) = yhat(x) when eps = 0.
    Scope: generic n, any mask, centered and RMS, any eps (and eps = 0)."""
    scaled = normalization(GROUP, center, lambda q: scale * x[q]).yhat(p)
    plain = normalization(GROUP, center).yhat(p)
    return reduced(scaled - plain.xreplace({eps: claimed_eps(scale)}), (scaled - plain).xreplace({eps: 0}))


def _masked_out(q: sp.Expr) -> sp.Expr:
    return 1 - m[q]


def padding_invariance(center: bool = True, moved: Callable[[sp.Expr], sp.Expr] = _masked_out) -> Residuals:
    """Padding invariance: d yhat_p/d x_j = 0 for masked-out j != p; valid yhat_p ignore any masked-out values.
    Scope: generic n, any mask, centered and RMS, any eps; valid outputs under every policy.

    moved(q) = 1 - m_q marks the positions whose inputs move (by arbitrary z_q).
    """
    norm = normalization(GROUP, center)
    derivative = moved(j) * sp.diff(norm.yhat(p), x[j]).xreplace({sp.KroneckerDelta(p, j): 0})
    changed = normalization(GROUP, center, lambda q: x[q] + moved(q) * MOVE[q])
    return reduced(derivative, (changed.yhat(p) - norm.yhat(p)).xreplace({m[p]: 1}))
