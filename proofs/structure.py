"""How a group's output depends on the arrangement of its positions: reordering them, and leaving
the masked-out ones out altogether. Explicit expansion (`expanded`) for every size n up to
PERMUTATION_SIZE = 8 (cheap: both sides expand to the same terms) and SUBSET_SIZE = 6 (all 63
nonempty masks of size 6 are written out, the bulk of `masknorm prove`'s time)."""

from __future__ import annotations

from typing import Callable, Sequence

import sympy as sp

from masknorm.proofs.expanded import at_size, nonempty_masks
from masknorm.proofs.residual import Residuals, reduced
from masknorm.spec.definitions import P, beta, gamma, m, normalization, x
from masknorm.spec.derivation import GENERAL, GROUP

PERMUTATION_SIZE = 8
SUBSET_SIZE = 6
VALUES = sp.IndexedBase("v")  # the valid values, renumbered 1..k
CARRIED = (x, m, gamma, beta, P)  # what moves with x along the reduced axes


def _generators(size: int) -> list[tuple[int, ...]]:
    """The transposition (1 2) and the cycle (1 2 ... n), as 0-based images of 0..n-1: they
    generate every permutation, and equivariance under two permutations gives it under their
    composition."""
    if size < 2:
        return []
    return [(1, 0) + tuple(range(2, size)), tuple((q + 1) % size for q in range(size))]


def permutation_equivariance(center: bool = True, size: int = PERMUTATION_SIZE,
                             carried: Sequence[sp.IndexedBase] = CARRIED) -> Residuals:
    """Permutation equivariance: permuting x, mask, weight, bias (and P) along the reduced axes permutes out alike.
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


def valid_values_alone(center: bool = True, size: int = SUBSET_SIZE,
                       kept: Callable[[tuple[int, ...]], list[int]] = _valid_positions) -> Residuals:
    """Masked group = its valid values alone: at valid positions yhat is the unmasked normalization of the valid values.
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
