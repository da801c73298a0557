"""A canonical form for expressions with sums over a symbolic group length n.

sympy alone does not cancel `Sum(m[i]*x[i], (i, 1, n)) - Sum(m[l]*x[l], (l, 1, n))` (the bound
indices differ) nor resolve `Sum(KroneckerDelta(i, j)*f(i), (i, 1, n))`. `Canonicalizer` rewrites
bottom-up (every Sum after its summand) with these rules, then expands:

  R1 linearity      Sum(a + b) -> Sum(a) + Sum(b);  Sum(c*f(i)) -> c*Sum(f(i)) for c free of i
                    (the summand is expanded first, so every term is a product).
  R2 constant       Sum(c, (i, a, b)) -> (b - a + 1)*c for c free of i.
  R3 Kronecker      Sum(KroneckerDelta(i, e)*f(i), (i, a, b)) -> f(e) for e free of i.  Free
                    indices name positions of the group, so a <= e <= b is assumed.
  R4 indicators     u[e]**q -> u[e] for every IndexedBase u declared an indicator (values in
                    {0, 1}, e.g. the mask m) and integer q >= 1.
  R5 one dummy      a Sum left after R1-R3 gets the index i_1 (i_2, ... when i_1 is already
                    bound inside its summand), so equal sums are equal atoms.
  R6 known sums     a Sum equal (after R5) to a declared one is replaced by its value, e.g.
                    Sum(m[i], (i, 1, n)) -> k, the definition of the valid count.
  R7 enumerations   Sum(f(e(r)), (r, 1, count)) -> Sum(w[i]*f(i), (i, 1, n)) for a declared
                    enumeration e of the positions i in 1..n with w_i = 1 (w an indicator, or 1),
                    count of them, when r occurs in the summand only as e(r): reindexing by the
                    bijection e. A permutation of 1..n is (e, n, 1); the increasing enumeration
                    of the valid positions V is (e, k, m). The result is rewritten again (R1-R6).
                    sympy cannot do this step itself: Sum.change_index takes only affine maps
                    i -> a*i + b, and an undefined Function has no bijection semantics; the
                    declaration is the assumption.

Sums that remain are atoms of the expanded result: an expression is identically zero under the
rules when its canonical form is 0 (denominators are monomials in symbols such as k, nu, s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import sympy as sp

DUMMY_PREFIX = "i_"


@dataclass(frozen=True)
class Enumeration:
    """function(1), ..., function(count) are the positions i in 1..length with weight(i) = 1, each
    once (R7): Sum(f(function(r)), (r, 1, count)) = Sum(weight(i) f(i), (i, 1, length))."""

    function: sp.FunctionClass
    count: sp.Expr
    length: sp.Expr
    weight: Callable[[sp.Expr], sp.Expr]


class Canonicalizer:
    """Rewrite with R1-R7 (module docstring): `canon(e)` is expand(rules(e))."""

    def __init__(self, indicators: Iterable[sp.IndexedBase] = (),
                 known_sums: Mapping[sp.Expr, sp.Expr] | None = None,
                 enumerations: Iterable[Enumeration] = ()) -> None:
        self.indicators = frozenset(indicators)
        self.enumerations = tuple(enumerations)
        self.known_sums: dict[sp.Expr, sp.Expr] = {}
        for total, value in (known_sums or {}).items():
            self.known_sums[self(total)] = value

    def __call__(self, expr: sp.Expr) -> sp.Expr:
        return sp.expand(self._rewrite(sp.sympify(expr)))

    def is_zero(self, expr: sp.Expr) -> bool:
        """True when the canonical form of expr is 0."""
        return self(expr) == 0

    def _rewrite(self, e: sp.Expr) -> sp.Expr:
        if not e.args:
            return e
        if isinstance(e, sp.Sum):
            return self._sum(e)
        if isinstance(e, sp.Indexed):
            return e
        e = e.func(*[self._rewrite(a) for a in e.args])
        if isinstance(e, sp.Pow) and self._is_indicator(e.base) and e.exp.is_integer and e.exp.is_positive:
            return e.base  # R4
        return e

    def _is_indicator(self, e: sp.Expr) -> bool:
        return isinstance(e, sp.Indexed) and e.base in self.indicators

    def _sum(self, e: sp.Sum) -> sp.Expr:
        body = e.function
        for limit in reversed(e.limits[1:]):  # Sum(f, L1, L2) = Sum(Sum(f, L1), L2)
            body = sp.Sum(body, limit)
        index, lo, hi = e.limits[0]
        expanded = sp.expand(self._rewrite(body))
        return sp.Add(*[self._term(t, index, lo, hi) for t in sp.Add.make_args(expanded)])

    def _term(self, term: sp.Expr, index: sp.Symbol, lo: sp.Expr, hi: sp.Expr) -> sp.Expr:
        if term == 0:
            return sp.S.Zero
        inside, outside = [], []
        for factor in sp.Mul.make_args(term):
            (inside if index in factor.free_symbols else outside).append(factor)
        coefficient = sp.Mul(*outside)
        if not inside:
            return coefficient * (hi - lo + 1)  # R2
        for pos, factor in enumerate(inside):
            if isinstance(factor, sp.KroneckerDelta):
                other = factor.args[1] if factor.args[0] == index else factor.args[0]
                if index not in other.free_symbols:  # R3
                    rest = sp.Mul(*(inside[:pos] + inside[pos + 1:]))
                    return coefficient * sp.expand(self._rewrite(rest.xreplace({index: other})))
        summand = sp.Mul(*inside)
        reindexed = self._reindex(summand, index, lo, hi)
        if reindexed is not None:
            return coefficient * reindexed
        dummy = _fresh_dummy(summand, index)
        atom = sp.Sum(summand.xreplace({index: dummy}), (dummy, lo, hi))  # R5
        return coefficient * self.known_sums.get(atom, atom)  # R6


    def _reindex(self, summand: sp.Expr, index: sp.Symbol, lo: sp.Expr, hi: sp.Expr) -> sp.Expr | None:
        """R7: the sum reindexed by the first declared enumeration it matches, rewritten; else None."""
        if lo != 1:
            return None
        for enum in self.enumerations:
            image = enum.function(index)
            if hi != enum.count or not summand.has(image):
                continue
            if index in summand.xreplace({image: sp.Dummy()}).free_symbols:
                continue  # index occurs outside enum(index): not a reindexing
            return self._sum(sp.Sum(enum.weight(index) * summand.xreplace({image: index}), (index, 1, enum.length)))
        return None


def _fresh_dummy(summand: sp.Expr, index: sp.Symbol) -> sp.Symbol:
    """The first i_1, i_2, ... bound nowhere inside summand and not free in it (except index)."""
    taken = {v for s in summand.atoms(sp.Sum) for v in s.variables} | (summand.free_symbols - {index})
    number = 1
    while True:
        candidate = sp.Symbol(f"{DUMMY_PREFIX}{number}", integer=True)
        if candidate not in taken:
            return candidate
        number += 1
