"""Print a closed form as plain Python arithmetic: only + - * / on its argument names and
integers, so the same text runs on floats, mpmath numbers and torch tensors elementwise."""

from __future__ import annotations

import sympy as sp
from sympy.printing.str import StrPrinter


class ArithmeticPrinter(StrPrinter):
    """sympy's str printer restricted to + - * /: integer powers become parenthesized products or
    quotients;
    anything else (functions, non-integer rationals or powers, floats) raises ValueError."""

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        exponent = expr.exp
        if not exponent.is_Integer or exponent == 0:
            raise ValueError(f"not plain arithmetic: {expr}")
        base = self.parenthesize(expr.base, 100)  # a product inside a quotient needs parentheses
        product = "*".join([base] * abs(int(exponent)))
        if exponent < 0:
            return f"1/({product})"
        return product if exponent == 1 else f"({product})"

    def _print_Rational(self, expr: sp.Rational) -> str:
        raise ValueError(f"not plain arithmetic (a non-integer constant): {expr}")

    def _print_Float(self, expr: sp.Float) -> str:
        raise ValueError(f"not plain arithmetic (a float constant): {expr}")

    def _print_Function(self, expr: sp.Function) -> str:
        raise ValueError(f"not plain arithmetic (a function): {expr}")

    def emptyPrinter(self, expr: object) -> str:
        raise ValueError(f"not plain arithmetic: {expr!r}")


def arithmetic(expr: sp.Expr) -> str:
    """The Python text of expr using only + - * / (ValueError if it needs anything else)."""
    for atom in expr.atoms():
        if not (atom.is_Symbol or atom.is_Integer):
            raise ValueError(f"not plain arithmetic: {atom} in {expr}")
    return ArithmeticPrinter().doprint(expr)
