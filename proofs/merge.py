"""The parallel merge of per-process statistics (masknorm.spec.merge) gives the statistics of all the
processes' valid values together: generic sizes, sums kept as Sums."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Tuple

import sympy as sp

from masknorm.proofs.residual import Residuals, reduced
from masknorm.spec import merge
from masknorm.spec.canonical import Canonicalizer
from masknorm.spec.definitions import i

SHIFT = sp.Symbol("c_shift", real=True)
Merge = Callable[[Sequence["Process"]], Tuple[sp.Expr, sp.Expr, sp.Expr]]


@dataclass(frozen=True)
class Process:
    """One process's group: n positions, values x_i, mask m_i in {0, 1}, k = sum_i m_i valid values."""

    name: str

    @property
    def x(self) -> sp.IndexedBase:
        return sp.IndexedBase(f"x_{self.name}")

    @property
    def m(self) -> sp.IndexedBase:
        return sp.IndexedBase(f"m_{self.name}")

    @property
    def n(self) -> sp.Symbol:
        return sp.Symbol(f"n_{self.name}", integer=True, positive=True)

    @property
    def k(self) -> sp.Symbol:
        return sp.Symbol(f"k_{self.name}", positive=True)

    def valid_sum(self, f: Callable[[sp.Expr], sp.Expr]) -> sp.Expr:
        """sum over this process's valid positions of f(x_i)."""
        return sp.Sum(self.m[i] * f(self.x[i]), (i, 1, self.n))

    @property
    def mean(self) -> sp.Expr:
        return self.valid_sum(lambda v: v) / self.k

    @property
    def m2(self) -> sp.Expr:
        return self.valid_sum(lambda v: (v - self.mean) ** 2)


def concatenated(processes: Sequence[Process]) -> Tuple[sp.Expr, sp.Expr, sp.Expr]:
    """(k, mu, M2) of the union of the processes' valid values, from the definition."""
    k = sum(p.k for p in processes)
    mu = sum(p.valid_sum(lambda v: v) for p in processes) / k
    return k, mu, sum(p.valid_sum(lambda v: (v - mu) ** 2) for p in processes)


def pairwise(processes: Sequence[Process]) -> Tuple[sp.Expr, sp.Expr, sp.Expr]:
    """Chan et al.'s rule folded over the processes."""
    k, mu, m2 = processes[0].k, processes[0].mean, processes[0].m2
    for p in processes[1:]:
        k, mu, m2 = merge.merge_pair(k, mu, m2, p.k, p.mean, p.m2)
    return k, mu, m2


def shifted(processes: Sequence[Process]) -> Tuple[sp.Expr, sp.Expr, sp.Expr]:
    """The implementation's rule, shifted by an arbitrary c."""
    return merge.merge_shifted([p.k for p in processes], [p.mean for p in processes], [p.m2 for p in processes], SHIFT)


def _canonicalizer(processes: Sequence[Process]) -> Canonicalizer:
    """Masks are 0/1 and sum to each process's k."""
    return Canonicalizer([p.m for p in processes], {sp.Sum(p.m[i], (i, 1, p.n)): p.k for p in processes})


def parallel_merge(processes: int = 2, rule: Merge = shifted) -> Residuals:
    """Parallel merge: per-process (k, mu, M2) merged give the (k, mu, M2) of all valid values together.
    Scope: generic n (sizes n_r) and valid counts k_r > 0, any masks, 2 processes (Chan's pairwise rule and
    the shifted rule, any shift c) and 3 (the shifted rule, and Chan's folded).

    rule(processes) -> (k, mu, M2) is the merge under test; residuals: its three values minus the
    concatenated values' statistics.
    """
    group = [Process(name) for name in "abc"[:processes]]
    claimed, truth = rule(group), concatenated(group)
    return reduced(*(a - b for a, b in zip(claimed, truth)), canon=_canonicalizer(group))
