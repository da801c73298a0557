"""The definition of masked normalization (CONTRACT.md) in sympy, for a generic group size n and
for concrete groups, with the symbols every derivation and proof shares.

One group of n positions, mask m_i in {0, 1}, k = sum_i m_i, nu = k - c:

    mu = (1/k) sum_i m_i x_i  (centered) or 0 (RMS);   var = (1/nu) sum_i m_i (x_i - mu)^2
    s = sqrt(var + eps);   yhat_p = (x_p - mu)/s
    out_p = P_p (gamma_p yhat_p + beta_p) + K (1 - P_p) x_p

P_p = 1 when position p is normalized with the group statistics, K = 1 when the others keep x.
The masked-out policies are POLICIES: "normalize" (P = 1), "keep" (P = m, K = 1), "zero"
(P = m, K = 0). `GenericGroup` writes the sums as sympy Sums over i = 1..n (k, nu symbols);
`ConcreteGroup` writes them out for a given 0/1 mask (k = its count, nu a symbol).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import sympy as sp

# sizes, statistics parameters and the scale s = sqrt(var + eps) named after differentiation
n = sp.Symbol("n", integer=True, positive=True)
k = sp.Symbol("k", positive=True)
nu = sp.Symbol("nu", positive=True)
c = sp.Symbol("c", integer=True, nonnegative=True)
eps = sp.Symbol("epsilon", nonnegative=True)
s = sp.Symbol("s", positive=True)
t = sp.Symbol("t")  # the parameter of a directional derivative (JVP)
K = sp.Symbol("K")  # 1 when masked-out positions keep x, 0 when they are zeroed

# positions: p an output position, j an input position; i, l, r the sums' bound indices
p, j = sp.symbols("p j", integer=True, positive=True)
i, l, r = sp.symbols("i l r", integer=True, positive=True)

# per-position quantities
x = sp.IndexedBase("x")  # input values
m = sp.IndexedBase("m")  # mask, 1 = valid
P = sp.IndexedBase("P")  # 1 = normalized with the group statistics
gamma = sp.IndexedBase("gamma")  # weight
beta = sp.IndexedBase("beta")  # bias
grad_out = sp.IndexedBase("gout")  # upstream gradient of out
g = sp.IndexedBase("g")  # gamma * grad_out: upstream gradient of yhat on P
xdot = sp.IndexedBase("xdot")  # tangents
gamma_dot = sp.IndexedBase("gammadot")
beta_dot = sp.IndexedBase("betadot")

INDICATORS = (m, P)

# bijections that reindex sums (canonical rule R7): a permutation of the positions 1..n, and the
# increasing enumeration sigma(1) < ... < sigma(k) of the valid positions V
pi = sp.Function("pi", integer=True, positive=True)
sigma = sp.Function("sigma", integer=True, positive=True)


@dataclass(frozen=True)
class Policy:
    """How masked-out positions are treated: normalized(p) is P_p, keep is K."""

    name: str
    normalized: Callable[[sp.Expr], sp.Expr]
    keep: int | sp.Expr


POLICIES = (
    Policy("normalize", lambda q: sp.S.One, 0),
    Policy("keep", lambda q: m[q], 1),
    Policy("zero", lambda q: m[q], 0),
)


class Group(Protocol):
    """A group of positions: sums over its positions, its valid count k and nu = k - c."""

    k: sp.Expr
    nu: sp.Expr

    def sum(self, f: Callable[[sp.Expr], sp.Expr], index: sp.Symbol) -> sp.Expr:
        """sum over all positions q of f(q); index names the bound variable where one is needed."""

    def valid_sum(self, f: Callable[[sp.Expr], sp.Expr], index: sp.Symbol) -> sp.Expr:
        """sum over all positions q of m_q f(q)."""


@dataclass(frozen=True)
class GenericGroup:
    """`size` positions 1..size (default n), sums kept as sympy Sums; k and nu are symbols (k = Sum(m_i));
    mask(q) is the mask at position q (default m[q])."""

    k: sp.Expr = k
    nu: sp.Expr = nu
    size: sp.Expr = n
    mask: Callable[[sp.Expr], sp.Expr] = m.__getitem__

    def sum(self, f: Callable[[sp.Expr], sp.Expr], index: sp.Symbol) -> sp.Expr:
        """Sum(f(index), (index, 1, size))."""
        return sp.Sum(f(index), (index, 1, self.size))

    def valid_sum(self, f: Callable[[sp.Expr], sp.Expr], index: sp.Symbol) -> sp.Expr:
        """Sum(mask(index)*f(index), (index, 1, size))."""
        return self.sum(lambda q: self.mask(q) * f(q), index)


@dataclass(frozen=True)
class ConcreteGroup:
    """Positions 1..len(mask) with a concrete 0/1 mask: sums written out, k = sum(mask); nu stays
    the symbol nu (= k - c), as no identity depends on its value."""

    mask: tuple[int, ...]
    nu: sp.Expr = nu

    @property
    def k(self) -> sp.Expr:
        return sp.Integer(sum(self.mask))

    @property
    def positions(self) -> range:
        return range(1, len(self.mask) + 1)

    def m(self, q: int) -> int:
        """The mask at position q (1-based)."""
        return self.mask[q - 1]

    def sum(self, f: Callable[[sp.Expr], sp.Expr], index: sp.Symbol) -> sp.Expr:
        """f(1) + ... + f(n)."""
        return sp.Add(*[f(q) for q in self.positions])

    def valid_sum(self, f: Callable[[sp.Expr], sp.Expr], index: sp.Symbol) -> sp.Expr:
        """Sum of f(q) over the positions q whose mask is 1."""
        return sp.Add(*[f(q) for q in self.positions if self.m(q)])


@dataclass(frozen=True)
class Normalization:
    """The statistics of one group for values value(q): mu, var, base = var + eps, s = sqrt(base)."""

    center: bool
    mu: sp.Expr
    var: sp.Expr
    base: sp.Expr
    value: Callable[[sp.Expr], sp.Expr]

    def yhat(self, q: sp.Expr) -> sp.Expr:
        """yhat_q = (value(q) - mu) / sqrt(var + eps)."""
        return (self.value(q) - self.mu) / sp.sqrt(self.base)

    def out(self, q: sp.Expr, policy: Policy, weight: sp.Expr, bias: sp.Expr) -> sp.Expr:
        """out_q = P_q (weight yhat_q + bias) + K (1 - P_q) value(q)."""
        normalized = policy.normalized(q)
        return normalized * (weight * self.yhat(q) + bias) + policy.keep * (1 - normalized) * self.value(q)


def normalization(group: Group, center: bool, value: Callable[[sp.Expr], sp.Expr] = x.__getitem__) -> Normalization:
    """mu = (1/k) sum_V value (0 for RMS), var = (1/nu) sum_V (value - mu)^2, base = var + eps."""
    mu = group.valid_sum(value, i) / group.k if center else sp.S.Zero
    var = group.valid_sum(lambda q: (value(q) - mu) ** 2, l) / group.nu
    return Normalization(center, mu, var, var + eps, value)


def name_scale(expr: sp.Expr, norm: Normalization) -> sp.Expr:
    """Replace sqrt(var + eps) by the symbol s in expr (after differentiation); eps must vanish."""
    named = expr.xreplace({norm.base: s**2})
    if eps in named.free_symbols:
        raise ValueError("sqrt(var + eps) survived in a form the scale symbol s does not match")
    return named


def degenerate_out(value: sp.Expr, valid: sp.Expr, zero: bool) -> sp.Expr:
    """Degenerate group: out = x, except masked-out positions under "zero": out = 0."""
    return value * (valid if zero else 1)


def concrete_masks(size: int) -> list[tuple[int, ...]]:
    """The masks checked for a group of `size`: all valid, single valid (first, last), alternating,
    last masked out, first masked out; deduplicated, in this order, none all-zero."""
    candidates: Sequence[tuple[int, ...]] = (
        (1,) * size,
        (1,) + (0,) * (size - 1),
        (0,) * (size - 1) + (1,),
        tuple(1 - q % 2 for q in range(size)),
        (1,) * (size - 1) + (0,),
        (0,) + (1,) * (size - 1),
    )
    masks: list[tuple[int, ...]] = []
    for mask in candidates:
        if any(mask) and mask not in masks:
            masks.append(mask)
    return masks
