"""The spec's generic definition written out for a concrete group size: n -> size, the valid
count k -> m[1] + ... + m[size] and nu -> k - c, every Sum expanded. The mask entries m[q] stay
symbols, so one expansion covers every mask."""

from __future__ import annotations

import itertools

import sympy as sp

from masknorm.spec.definitions import c, k, m, n, nu


def at_size(expr: sp.Expr, size: int) -> sp.Expr:
    """expr of the generic group with n = size, k = sum of the mask entries, nu = k - c."""
    count = sp.Add(*[m[q] for q in range(1, size + 1)])
    return expr.xreplace({nu: k - c}).xreplace({k: count, n: sp.Integer(size)}).doit()


def nonempty_masks(size: int) -> list[tuple[int, ...]]:
    """Every 0/1 mask of the size with at least one valid position."""
    return [mask for mask in itertools.product((0, 1), repeat=size) if any(mask)]
