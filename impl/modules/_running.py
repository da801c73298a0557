"""Batch statistics for running averages: masked mean and unbiased masked variance, without autograd.

    mean = (1/k) sum_V x,   var = (1/(k-1)) sum_V (x - mean)^2,   k = |V|

Masked-out values go through torch.where only, so whatever they hold never reaches a statistic;
no boolean indexing and no host synchronisation, so the helpers trace under torch.compile. The
moments themselves are _merge.local_moments': one routine for every running statistic.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from masknorm._autograd import compute_dtype
from masknorm.modules._merge import local_moments


class Moments(NamedTuple):
    """Per-group statistics, reduced axes kept as size 1."""

    mean: torch.Tensor
    var: torch.Tensor  # unbiased: divisor k - 1
    count: torch.Tensor  # k, in the statistics' dtype


@torch.no_grad()
def masked_moments(x: torch.Tensor, mask: Optional[torch.Tensor], dims: Sequence[int]) -> Moments:
    """Mean and unbiased variance M2/(k-1) of the valid values of x over `dims` (mask broadcastable to
    x), in x's computation dtype: the moments of masknorm.modules._merge.local_moments (float64,
    scaled and shifted, so that equal values give a variance of exactly 0), the one masked-moments
    routine of the running statistics, single-process and synchronized."""
    k, mean, root_m2 = local_moments(x, mask, dims)
    var = root_m2 * root_m2 / (k - 1).clamp(min=1)
    dtype = compute_dtype(x.dtype)
    return Moments(mean.to(dtype), var.to(dtype), k.to(dtype))


@torch.no_grad()
def pool_instances(m: Moments, n_channels: int) -> Moments:
    """Per channel, the plain average over the instances (axis 0) with k > 1; count = how many there are."""
    usable = m.count.reshape(-1, n_channels) > 1
    n = usable.sum(0, dtype=m.mean.dtype)
    mean = torch.where(usable, m.mean.reshape(-1, n_channels), 0).sum(0) / n.clamp(min=1)
    var = torch.where(usable, m.var.reshape(-1, n_channels), 0).sum(0) / n.clamp(min=1)
    return Moments(mean, var, n)


@torch.no_grad()
def update_running(
    running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
    usable: torch.Tensor, factor: Union[float, torch.Tensor],
) -> None:
    """r <- (1 - factor) r + factor * stat in place, on the channels where `usable` (the others keep r)."""
    shape = running_mean.shape
    mean, var, usable = mean.reshape(shape), var.reshape(shape), usable.reshape(shape)
    for running, stat in ((running_mean, mean), (running_var, var)):
        new = (1 - factor) * running + factor * stat.to(running.dtype)
        running.copy_(torch.where(usable, new, running))
