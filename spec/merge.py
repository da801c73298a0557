"""Merging the statistics of several processes' valid values (the rule behind MaskedSyncBatchNorm).

Process r holds k_r valid values with mean mu_r and M2_r = sum (x - mu_r)^2 over them. The statistics
of all the values together are

    pairwise (Chan et al.):  k = k_a + k_b,  mu = mu_a + (mu_b - mu_a) k_b / k,
                             M2 = M2_a + M2_b + (mu_b - mu_a)^2 k_a k_b / k
    R processes, shifted by any c (masknorm uses the first non-empty process's mean):
                             D = (1/k) sum_r k_r (mu_r - c),  mu = c + D,
                             M2 = sum_r M2_r + sum_r k_r (mu_r - c - D)^2

`masknorm prove` (theorem parallel_merge) proves both equal the concatenated values' statistics for
generic sizes. Plain arithmetic on sequences (Python's sum), so the same code runs on sympy symbols,
mpmath numbers and torch tensors stacked per process (masknorm.modules._merge, masknorm.reference.merge);
k > 0 is the caller's to ensure (the rule divides by it).
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

__all__ = ["merge_pair", "merge_shifted"]


def merge_pair(k_a: Any, mu_a: Any, m2_a: Any, k_b: Any, mu_b: Any, m2_b: Any) -> Tuple[Any, Any, Any]:
    """(k, mu, M2) of two processes' values together, Chan et al.'s pairwise rule."""
    k = k_a + k_b
    delta = mu_b - mu_a
    return k, mu_a + delta * k_b / k, m2_a + m2_b + delta * delta * k_a * k_b / k


def merge_shifted(counts: Sequence[Any], means: Sequence[Any], m2s: Sequence[Any], c: Any) -> Tuple[Any, Any, Any]:
    """(k, mu, M2) of R processes' values together, every mean taken relative to the shift c."""
    k = sum(counts)
    drift = sum(k_r * (mu_r - c) for k_r, mu_r in zip(counts, means)) / k
    spread = sum(k_r * (mu_r - c - drift) ** 2 for k_r, mu_r in zip(counts, means))
    return k, c + drift, sum(m2s) + spread
