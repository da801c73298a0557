"""Masked instance norm: statistics per (sample, channel) over the valid spatial positions."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

from masknorm._contract import check_mask_tensor
from masknorm.fast import channel_lane
from masknorm.modules._masks import valid_mask
from masknorm.modules._norm_base import MaskedRunningNorm
from masknorm.modules._running import masked_moments, pool_instances, update_running


class _MaskedInstanceNorm(MaskedRunningNorm, _InstanceNorm):
    """y = gamma (x - mu_bc)/sqrt(var_bc + eps) + beta, mu_bc/var_bc over the valid positions of sample b, channel c.

    x is (B, C, *spatial) or unbatched (C, *spatial); mask is (B, *spatial) or (B, 1, *spatial)
    (unbatched: (*spatial) or (1, *spatial)); sizes may be 1. A mask never carries the channel axis.
    None = all valid, and the module equals torch's.

    Instance statistics normalize in training and whenever track_running_stats is False. With running
    statistics, training moves them (torch's rule) towards the plain average over the samples with
    k > 1 valid positions of their masked mean and unbiased masked variance (divisor k - 1); a channel
    with no such sample keeps its values; momentum=None means no update and num_batches_tracked stays
    0, as in torch's instance norm. Eval with running statistics: gamma (x - running_mean)/sqrt(running_var + eps)
    + beta at every position under "normalize", x ("keep") or 0 ("zero") at masked-out positions.
    A sample-channel with no valid position passes x through (0 under "zero").
    """

    _no_batch_dim = 0

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, *, bias: bool = True, masked: str = "normalize") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias, masked=masked)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = valid_mask(mask, padding_mask)
        self._check_input_dim(x)
        if x.dim() == self._no_batch_dim:
            if mask is not None:
                check_mask_tensor(mask)
                mask = mask.unsqueeze(0)
            return self.forward(x.unsqueeze(0), mask).squeeze(0)
        mask = self._prepare(x, mask)
        if not self.training and self.track_running_stats:
            return self._normalize_running(x, mask)
        dims = tuple(range(2, x.dim()))
        if self.running_mean is not None:
            m = pool_instances(masked_moments(x, mask, dims), self.num_features)
            factor = 0.0 if self.momentum is None else self.momentum
            update_running(self.running_mean, self.running_var, m.mean, m.var, m.count > 0, factor)
        out = channel_lane.eager_call(x, mask, (self.num_features,), self.eps, self.weight, self.bias, self.masked)
        return out if out is not None else self._normalize_batch(x, mask, dims)[0]


class MaskedInstanceNorm1d(_MaskedInstanceNorm, nn.InstanceNorm1d):
    __doc__ = "Masked nn.InstanceNorm1d: x (B, C, L) with mask (B, L).\n\n" + _MaskedInstanceNorm.__doc__

    _input_dims = (2, 3)
    _no_batch_dim = 2


class MaskedInstanceNorm2d(_MaskedInstanceNorm, nn.InstanceNorm2d):
    __doc__ = "Masked nn.InstanceNorm2d: x (B, C, H, W) with mask (B, H, W).\n\n" + _MaskedInstanceNorm.__doc__

    _input_dims = (3, 4)
    _no_batch_dim = 3


class MaskedInstanceNorm3d(_MaskedInstanceNorm, nn.InstanceNorm3d):
    __doc__ = "Masked nn.InstanceNorm3d: x (B, C, D, H, W) with mask (B, D, H, W).\n\n" + _MaskedInstanceNorm.__doc__

    _input_dims = (4, 5)
    _no_batch_dim = 4
