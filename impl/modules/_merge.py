"""Per-group moments of one process's valid values, and their parallel merge (Chan et al.).

One process holds, per group, k valid values with mean mu and M2 = sum_V (x - mu)^2. Processes
r = 1..R merge into the moments of all their valid values together:

    k  = sum_r k_r,    c = mu_r of the first process with k_r > 0 (0 if there is none)
    D  = (1/k) sum_r k_r (mu_r - c),    mu = c + D
    M2 = sum_r M2_r + sum_r k_r (mu_r - c - D)^2

(masknorm.spec.merge; for two processes it is Chan et al.'s M2_a + M2_b + (mu_b - mu_a)^2 k_a k_b / k;
`masknorm prove` proves both equal the moments of the concatenated values). Shifting by c makes equal means merge to
exactly that mean with M2 = sum_r M2_r, so a constant group stays exactly constant.

Range: a process sends sqrt(M2) rather than M2, and every quantity is scaled by an exact power of two
A >= max_r(|mu_r|, sqrt(M2_r)) before squaring, so no square overflows or underflows spuriously.
Everything is float64 (float32 inputs and below accumulate exactly enough; float64 inputs are
handled by the scaling). Masked-out values reach nothing but torch.where.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from masknorm._stats import exponent_bounds, first_valid, inverse_power_of_two, valid_count, where_or_zero
from masknorm.spec.merge import merge_shifted

ACCUMULATE = torch.float64


class LocalMoments(NamedTuple):
    """One process's per-group (k, mu, sqrt(M2)), float64, keepdim shape."""

    count: torch.Tensor
    mean: torch.Tensor
    root_m2: torch.Tensor


class MergedMoments(NamedTuple):
    """Moments of all processes' valid values: M2 = m2_scaled / inv_scale^2, inv_scale = 1/A."""

    count: torch.Tensor
    mean: torch.Tensor
    m2_scaled: torch.Tensor
    inv_scale: torch.Tensor


def _inverse_power_of_two(magnitude: torch.Tensor) -> torch.Tensor:
    """1/A for a power of two A within a factor 2 of magnitude (masknorm._stats.inverse_power_of_two;
    A = 1 for magnitude 0), exact."""
    inv = inverse_power_of_two(magnitude, *exponent_bounds(magnitude.dtype, 0.0))
    return torch.where(magnitude > 0, inv, 1.0)


@torch.no_grad()
def local_moments(x: torch.Tensor, mask: Optional[torch.Tensor], dims: Sequence[int]) -> LocalMoments:
    """(k, mu, sqrt(M2)) of the valid values of x over `dims` (mask broadcastable to x), two-pass in
    float64 on values scaled by a power of two and shifted by the group's first valid value
    (so that equal values give M2 = 0 exactly). A group with k = 0 gives (0, 0, 0)."""
    dims = list(dims)
    kept = [1 if d in dims else n for d, n in enumerate(x.shape)]
    if x.numel() == 0:
        zeros = x.new_zeros(kept, dtype=ACCUMULATE)
        return LocalMoments(zeros, zeros, zeros)
    xd = x.detach().to(ACCUMULATE)
    xz = xd if mask is None else where_or_zero(mask, xd)
    k = valid_count(mask, x.shape, dims, ACCUMULATE, x.device).expand(kept)
    inv_a = _inverse_power_of_two(torch.amax(xz.abs(), dims, keepdim=True))
    c0 = first_valid(xz, mask, dims) * inv_a
    d = xz * inv_a - c0
    d = d if mask is None else where_or_zero(mask, d)
    shift = d.sum(dims, keepdim=True) / k.clamp(min=1)
    dev = d - shift if mask is None else where_or_zero(mask, d - shift)
    m2_s = (dev * dev).sum(dims, keepdim=True)
    return LocalMoments(k, (c0 + shift) / inv_a, torch.sqrt(m2_s) / inv_a)


def merge_moments(moments: LocalMoments) -> MergedMoments:
    """Merge per-process moments stacked along axis 0 with masknorm.spec.merge.merge_shifted (module
    docstring); processes with k = 0 contribute nothing, whatever their other entries hold, and a
    group with no valid value anywhere gets (0, 0, 0)."""
    k, mean, root = moments
    has = k > 0
    inv_scale = _inverse_power_of_two(torch.where(has, torch.maximum(mean.abs(), root), 0).amax(0))
    ms = where_or_zero(has, mean * inv_scale)
    rs = where_or_zero(has, root * inv_scale)
    c = ms.gather(0, has.to(torch.uint8).argmax(0, keepdim=True)).squeeze(0)
    total, mu_s, m2_s = merge_shifted(list(k.unbind(0)), list(ms.unbind(0)), list((rs * rs).unbind(0)), c)
    some = total > 0
    return MergedMoments(total, where_or_zero(some, mu_s) / inv_scale, where_or_zero(some, m2_s), inv_scale)
