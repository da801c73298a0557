"""How a group's output depends on the arrangement of its positions: reordering them, and leaving
the masked-out ones out altogether.

Generic n: sums over the reordered or the valid positions are reindexed by a declared bijection
(canonical rule R7): a permutation pi of 1..n, and the increasing enumeration sigma of the k valid
positions (Sum_{r=1..k} f(sigma(r)) = Sum_{i=1..n} m_i f(i)). That rule is the one step taken on
trust from outside sympy (sympy's Sum.change_index reindexes by affine maps only); the explicit
expansions (`*_expanded`, `masknorm prove --expanded`) confirm both theorems without it for
n <= PERMUTATION_SIZE = 8 and n <= SUBSET_SIZE = 6 (all 63 nonempty masks of size 6).
"""

from __future__ import annotations

from typing import Callable, Sequence

import sympy as sp

from masknorm.proofs.expanded import at_size, nonempty_masks
from masknorm.proofs.residual import Residuals, reduced
from masknorm.spec.definitions import (
    K, GenericGroup, P, Policy, beta, gamma, k, m, n, normalization, nu, p, pi, sigma, x,
)
from masknorm.spec.derivation import GENERAL, GROUP

PERMUTATION_SIZE = 8
SUBSET_SIZE = 6
VALUES = sp.IndexedBase("v")  # the valid values, renumbered 1..k
CARRIED = (x, m, gamma, beta, P)  # what moves with x along the reduced axes
RANK = sp.Symbol("rho", integer=True, positive=True)  # the rank of a valid position p in V: sigma(rho) = p


def permutation_equivariance(center: bool = True, carried: Sequence[sp.IndexedBase] = CARRIED,
                             permutation: sp.FunctionClass = pi) -> Residuals:
    """Permutation equivariance: permuting x, mask, weight, bias (and P) along the reduced axes permutes out alike.
    Scope: generic n, any permutation pi of 1..n, any mask, every policy (P_p, K symbolic), centered and RMS,
    any eps.

    The permuted group holds base[pi(q)] at position q for every base in `carried`; its output at p
    equals the original output at pi(p). `permutation` must be declared a bijection (R7).
    """
    def moved(base: sp.IndexedBase) -> Callable[[sp.Expr], sp.Expr]:
        return (lambda q: base[permutation(q)]) if base in carried else base.__getitem__

    permuted = normalization(GenericGroup(mask=moved(m)), center, moved(x))
    out = permuted.out(p, Policy("permuted", moved(P), K), moved(gamma)(p), moved(beta)(p))
    image = permutation(p)
    return reduced(out - normalization(GROUP, center).out(image, GENERAL, gamma[image], beta[image]))


def _valid_values() -> tuple[Callable[[sp.Expr], sp.Expr], sp.Expr, sp.FunctionClass]:
    return (lambda r: x[sigma(r)]), k, sigma


def valid_values_alone(center: bool = True,
                       kept: Callable[[], tuple[Callable[[sp.Expr], sp.Expr], sp.Expr, sp.FunctionClass]] = _valid_values,
                       alone_nu: sp.Expr = nu, rank: Callable[[sp.Expr], sp.Expr] = lambda r: r) -> Residuals:
    """Masked group = its valid values alone: at valid positions yhat is the unmasked normalization of the valid values.
    Scope: generic n, any mask, centered and RMS, any correction, any eps (alone: x[sigma(1..k)], k positions).

    kept() gives the alone group's values, its size and the map from rank to position; valid p is
    sigma(rho) and the alone group's output at rank(rho) is compared with the masked group's at p.
    """
    values, count, position = kept()
    alone = normalization(GenericGroup(nu=alone_nu, size=count, mask=lambda q: sp.S.One), center, values)
    at_p = alone.yhat(rank(RANK)).xreplace({position(RANK): p})
    return reduced(normalization(GROUP, center).yhat(p) - at_p)


def _generators(size: int) -> list[tuple[int, ...]]:
    """The transposition (1 2) and the cycle (1 2 ... n), as 0-based images of 0..n-1: they
    generate every permutation, and equivariance under two permutations gives it under their
    composition."""
    if size < 2:
        return []
    return [(1, 0) + tuple(range(2, size)), tuple((q + 1) % size for q in range(size))]


def permutation_equivariance_expanded(center: bool = True, size: int = PERMUTATION_SIZE,
                                      carried: Sequence[sp.IndexedBase] = CARRIED) -> Residuals:
    """Permutation equivariance, expanded: permuting x, mask, weight, bias (and P) permutes out alike.
    Scope: n <= 8 by explicit expansion, every mask (symbolic entries), every policy (P_p, K symbolic),
    centered and RMS, any eps."""
    residuals = []
    for group_size in range(1, size + 1):
        outputs = [at_size(normalization(GROUP, center).out(q, GENERAL, gamma[q], beta[q]), group_size)
                   for q in range(1, group_size + 1)]
        for perm in _generators(group_size):
            moves = {base[q + 1]: base[perm[q] + 1] for base in carried for q in range(group_size)}
            residuals += [outputs[q].xreplace(moves) - outputs[perm[q]] for q in range(group_size)]
    return reduced(*residuals, rationalize=False)


def _valid_positions(mask: tuple[int, ...]) -> list[int]:
    return [q + 1 for q, valid in enumerate(mask) if valid]


def valid_values_alone_expanded(center: bool = True, size: int = SUBSET_SIZE,
                                kept: Callable[[tuple[int, ...]], list[int]] = _valid_positions) -> Residuals:
    """Masked group = its valid values alone, expanded: at valid positions yhat is the unmasked normalization of them.
    Scope: n <= 6 by explicit expansion, every nonempty 0/1 mask, centered and RMS, any correction, any eps."""
    unmasked = normalization(GROUP, center, VALUES.__getitem__)
    residuals = []
    for group_size in range(1, size + 1):
        for mask in nonempty_masks(group_size):
            masked = {m[q + 1]: valid for q, valid in enumerate(mask)}
            positions = kept(mask)
            alone = {m[q]: 1 for q in range(1, len(positions) + 1)} | {VALUES[q + 1]: x[position]
                                                                      for q, position in enumerate(positions)}
            for rank, position in enumerate(_valid_positions(mask), start=1):
                residuals.append(at_size(normalization(GROUP, center).yhat(position), group_size).xreplace(masked)
                                 - at_size(unmasked.yhat(rank), len(positions)).xreplace(alone))
    return reduced(*residuals, rationalize=False)
