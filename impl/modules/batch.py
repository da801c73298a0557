"""Masked batch norm: statistics per channel over the valid positions of the batch."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from masknorm.fast import per_channel
from masknorm.models.padding_context import channel_block_mask
from masknorm.modules._norm_base import MaskedRunningNorm
from masknorm.modules._running import Moments, masked_moments, update_running
from masknorm.modules._masks import valid_mask


class _MaskedBatchNorm(MaskedRunningNorm, _BatchNorm):
    """y = gamma (x - mu_c)/sqrt(var_c + eps) + beta, mu_c/var_c over the valid positions of channel c.

    x is (B, C, *spatial) (BatchNorm1d also (B, C)); mask is (B, *spatial) or (B, 1, *spatial)
    (x (B, C) takes mask (B,): the rows of a point cloud or of a Keras-style (N, C) batch); sizes may be 1.
    A mask never carries the channel axis. None = all valid, and the module equals torch's.

    Training (or running statistics None): the batch's masked statistics normalize (biased variance,
    as torch); with track_running_stats, running_mean/var move towards the masked mean and the
    unbiased masked variance (divisor k - 1) by `momentum`; a channel with k <= 1 valid positions keeps
    its running values. num_batches_tracked counts training calls as torch's does, except with
    momentum=None, where it is the average's divisor and counts only the batches with data (k > 1; k is
    the same on every channel, as the mask carries no channel axis): momentum=None is the plain average
    of the statistics of the batches with data, an all-padding batch is not counted.
    Masked-out positions: "normalize" gets the batch's normalization, "keep" returns x, "zero" returns 0;
    a batch with no valid position passes x through (0 under "zero").

    Eval with running statistics: out = gamma (x - running_mean)/sqrt(running_var + eps) + beta at every
    position under "normalize" (exactly torch's eval output); "keep" returns x and "zero" 0 at masked-out positions.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, *, bias: bool = True, masked: str = "normalize") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias, masked=masked)

    def _track(self, batch: Moments) -> None:
        """r <- (1 - f) r + f stat on the channels with k > 1, f = momentum, or 1/num_batches_tracked
        when momentum is None, where the batch counts (num_batches_tracked += 1) only if some channel
        has k > 1 (with a momentum every call counts, as in torch). Tensor ops only: no host sync,
        traceable."""
        usable = batch.count > 1
        factor: Union[float, torch.Tensor] = 0.0 if self.momentum is None else self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1 if self.momentum is not None else usable.any().to(self.num_batches_tracked.dtype))
            if self.momentum is None:
                factor = 1.0 / self.num_batches_tracked.clamp(min=1).double()
        update_running(self.running_mean, self.running_var, batch.mean, batch.var, usable, factor)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = valid_mask(mask, padding_mask)
        affine = self._lane_affine(x)
        if affine is not None:
            mask = channel_block_mask(self, x, mask)  # after x's checks, where the route looks a block's mask up
            out = self._lane(x, mask, *affine)
            if out is not None:
                return out
        return self._route(x, mask)

    def _lane_affine(self, x: torch.Tensor) -> Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
        """(weight, bias) where x and they are what the lane takes, else None: x of the kernel's dtypes on CPU with
        the module's rank and channels, weight and bias (C,) of x's dtype on CPU or None (the route's checks pass)."""
        if not (type(x) is torch.Tensor and x.dim() in self._input_dims and x.shape[1] == self.num_features
                and x.dtype in per_channel.KERNEL_DTYPES and x.is_cpu):
            return None
        params, shape = self._parameters, (self.num_features,)
        if "weight" not in params or "bias" not in params:  # parametrized or replaced: the route reads self.weight
            return None
        weight, bias = params["weight"], params["bias"]
        if ((weight is None or (weight.dtype == x.dtype and weight.is_cpu and weight.shape == shape))
                and (bias is None or (bias.dtype == x.dtype and bias.is_cpu and bias.shape == shape))):
            return weight, bias
        return None

    def _lane(self, x: torch.Tensor, mask: Optional[torch.Tensor], weight: Optional[torch.Tensor],
              bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """This call without the route's Python, bit for bit the route's: with batch statistics one call of the
        per-channel kernel and one of its running update (fast.per_channel.eager_call: eager mode on real data),
        with running statistics torch.batch_norm alone where the route's frozen_norm is that and the policy leaves
        its output as is, else _normalize_running itself; None where the lane does not take the call (the route
        checks it, raises or runs it): mask None or a bool CPU tensor (B, *spatial)."""
        buffers = self._buffers
        if "running_mean" not in buffers or "running_var" not in buffers:  # parametrized or replaced: the route's
            return None
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        if self.training or (running_mean is None and running_var is None):
            running = None
            if self.training and self.track_running_stats and running_mean is not None:
                running = (running_mean, running_var, buffers.get("num_batches_tracked"), self.momentum)
            return per_channel.eager_call(x, mask, weight, bias, self.eps, self.masked, running)
        if not per_channel.plain_mask(x, mask):
            return None
        eps = self.eps
        if ((mask is None or self.masked == "normalize") and type(eps) is float and eps >= 0
                and not (torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                                      or (bias is not None and bias.requires_grad)))):
            return torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps,
                                    torch.backends.cudnn.enabled)  # F.batch_norm's call, without its Python
        return self._normalize_running(x, None if mask is None else mask.unsqueeze(1))

    def _route(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The call through _prepare and masked_norm_with_moments (or the running statistics), and _track."""
        self._check_input_dim(x)
        mask = self._prepare(x, mask)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        if not use_batch:
            return self._normalize_running(x, mask)
        dims = (0,) + tuple(range(2, x.dim()))
        out, moments = self._normalize_batch(x, mask, dims)
        if self.training and self.track_running_stats and self.running_mean is not None:
            self._track(masked_moments(x, mask, dims) if moments is None else Moments(*moments))
        return out


class MaskedBatchNorm1d(_MaskedBatchNorm, nn.BatchNorm1d):
    __doc__ = "Masked nn.BatchNorm1d: x (B, C) with mask (B,), or x (B, C, L) with mask (B, L).\n\n" + _MaskedBatchNorm.__doc__

    _input_dims = (2, 3)


class MaskedBatchNorm2d(_MaskedBatchNorm, nn.BatchNorm2d):
    __doc__ = "Masked nn.BatchNorm2d: x (B, C, H, W) with mask (B, H, W).\n\n" + _MaskedBatchNorm.__doc__

    _input_dims = (4,)


class MaskedBatchNorm3d(_MaskedBatchNorm, nn.BatchNorm3d):
    __doc__ = "Masked nn.BatchNorm3d: x (B, C, D, H, W) with mask (B, D, H, W).\n\n" + _MaskedBatchNorm.__doc__

    _input_dims = (5,)
