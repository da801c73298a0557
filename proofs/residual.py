"""Residuals of the theorems and the one reduction that decides them: a theorem is proved when
every residual it returns reduces to exactly 0.

`reduce` applies, each step an equality: the spec's canonicalizer (`masknorm.spec.derivation`:
Sum linearity, Kronecker deltas, indicators m**q = m, one dummy index, Sum(m) = k) until nothing
changes (products of indicators formed by one pass's expansion are reduced by the next); then
every radical base is factored, so that positive factors leave the root (sqrt(V + e/a**2) =
sqrt(a**2 V + e)/a for a > 0); then the result is brought over a common denominator and cancelled.
The later steps run only while the residual is not yet 0; explicit expansions (no radicals to
factor, residuals that blow up when rationalized) ask for the canonical form alone.
"""

from __future__ import annotations

from typing import Iterable

import sympy as sp

from masknorm.spec.canonical import Canonicalizer
from masknorm.spec.derivation import canonicalizer

Residuals = tuple[sp.Expr, ...]
MAX_PASSES = 8


def _canonical(expr: sp.Expr, canon: Canonicalizer | None = None) -> sp.Expr:
    canon = canon or canonicalizer()
    for _ in range(MAX_PASSES):
        reduced = canon(expr)
        if reduced == expr:
            return reduced
        expr = reduced
    raise ArithmeticError(f"the canonical form did not settle after {MAX_PASSES} passes: {expr}")


def _is_radical(expr: sp.Expr) -> bool:
    return expr.is_Pow and expr.exp.is_Rational and not expr.exp.is_integer


def _factor_radicals(expr: sp.Expr) -> sp.Expr:
    return sp.expand(expr.replace(_is_radical, lambda root: sp.Pow(sp.factor(root.base), root.exp)))


def reduce(expr: sp.Expr, rationalize: bool = True, canon: Canonicalizer | None = None) -> sp.Expr:
    """expr brought to the form in which a true identity reads 0 (module docstring); rationalize=False
    stops at the canonical form; canon replaces the definitions' canonicalizer (other indicators and
    known sums)."""
    reduced = _canonical(sp.sympify(expr), canon)
    for step in (_factor_radicals, _over_common_denominator) if rationalize else ():
        if reduced == 0:
            return reduced
        reduced = step(reduced)
    return reduced


def _over_common_denominator(expr: sp.Expr) -> sp.Expr:
    return sp.cancel(sp.together(expr))


def reduced(*exprs: sp.Expr, rationalize: bool = True, canon: Canonicalizer | None = None) -> Residuals:
    """Each residual reduced; a theorem returns these."""
    return tuple(reduce(e, rationalize, canon) for e in exprs)


def vanishes(residuals: Iterable[sp.Expr]) -> bool:
    """True when every (reduced) residual is exactly 0."""
    return all(r == 0 for r in residuals)
