"""The statistics of several processes' valid values, in mpmath: directly from the values, and by the
spec's merge rule (masknorm.spec.merge) from per-process (k, mu, M2); both rounded once to float64.

    moments(values)             = (k, mu, M2) of the concatenated values, exact inputs, `dps` digits
    merge(counts, means, m2s)   = merge_shifted of the exact per-process inputs (shift: the first
                                  non-empty process's mean), `dps` digits

so an implementation's merge is checked on its own inputs (merge) and end to end (moments).
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import mpmath
import numpy as np

from masknorm.spec.merge import merge_shifted

from .convert import float_array


def _exact(a: Any, name: str) -> list:
    return [mpmath.mpf(float(v)) for v in float_array(a, name).reshape(-1)]


def moments(values: Sequence[Any], dps: int = 50) -> Tuple[float, float, float]:
    """(k, mu, M2) of all the arrays' values together (M2 = sum (x - mu)^2); (0, 0, 0) when empty."""
    with mpmath.workdps(dps):
        xs = [v for i, a in enumerate(values) for v in _exact(a, f"values[{i}]")]
        if not xs:
            return 0.0, 0.0, 0.0
        mu = mpmath.fsum(xs) / len(xs)
        return float(len(xs)), float(mu), float(mpmath.fsum((v - mu) ** 2 for v in xs))


def merge(counts: Any, means: Any, m2s: Any, dps: int = 50) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """merge_shifted over axis 0 of the per-process (counts, means, m2s) (arrays of one shape (R, *G)),
    per trailing index; processes with k = 0 are left out; (0, 0, 0) where none is left."""
    arrays = [float_array(a, name) for a, name in ((counts, "counts"), (means, "means"), (m2s, "m2s"))]
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays) or len(shape) < 1:
        raise ValueError(f"counts, means and m2s must share one shape (R, ...), got {[a.shape for a in arrays]}")
    flat = [a.reshape(shape[0], -1) for a in arrays]
    out = np.zeros((3, flat[0].shape[1]))
    with mpmath.workdps(dps):
        for g in range(flat[0].shape[1]):
            rows = [(mpmath.mpf(float(k)), mpmath.mpf(float(mu)), mpmath.mpf(float(m2)))
                    for k, mu, m2 in zip(*(f[:, g] for f in flat)) if k > 0]
            if rows:
                ks, mus, m2 = zip(*rows)
                out[:, g] = [float(v) for v in merge_shifted(ks, mus, m2, mus[0])]
    return tuple(o.reshape(shape[1:]) for o in out)
