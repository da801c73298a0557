"""Masked group norm: statistics per (sample, group) over the group's channels and valid positions."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from masknorm.functional import masked_norm
from masknorm.fast import channel_lane
from masknorm.modules._masks import affine_parameters, channel_mask, channel_view, valid_mask
from masknorm.modules._norm_base import bias_kwarg
from masknorm.models.padding_context import channel_block_mask
from masknorm._contract import check_affine, check_eps, check_groups, check_policy


class MaskedGroupNorm(nn.GroupNorm):
    """Masked nn.GroupNorm: y = gamma_c (x - mu_bg)/sqrt(var_bg + eps) + beta_c, over channels in group g and valid positions.

    x (B, C, *spatial) is viewed as (B, G, C/G, *spatial); mask is (B, *spatial) or (B, 1, *spatial)
    (sizes may be 1; a mask never carries the channel axis); None = all valid, and the module
    equals torch's. Masked-out positions: normalized with their group's statistics ("normalize"),
    x ("keep") or 0 ("zero"); a (sample, group) with no valid position passes x through (0 under "zero").
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, *, bias: bool = True,
                 masked: str = "normalize") -> None:
        check_groups(type(self).__name__, num_groups, num_channels)
        check_eps(type(self).__name__, eps)
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, **bias_kwarg(bias))
        self.masked = check_policy(masked)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = valid_mask(mask, padding_mask)
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"x of shape {tuple(x.shape)} is not (B, C={self.num_channels}, *spatial)")
        weight, bias = affine_parameters(self)
        check_affine(type(self).__name__, weight, bias, (self.num_channels,), "num_channels")
        mask = channel_block_mask(self, x, mask)
        g = self.num_groups
        lead = (g, self.num_channels // g)
        out = channel_lane.eager_call(x, mask, lead, self.eps, weight, bias, self.masked)
        if out is not None:
            return out
        mask, trailing = channel_mask(x, mask), x.dim() - 2
        grouped = x.reshape(x.shape[0], *lead, *x.shape[2:])
        out = masked_norm(
            grouped, None if mask is None else mask.unsqueeze(1), tuple(range(2, grouped.dim())), eps=self.eps,
            weight=channel_view(weight, lead, trailing), bias=channel_view(bias, lead, trailing), masked=self.masked,
        )
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, masked={self.masked!r}"
