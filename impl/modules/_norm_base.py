"""What batch and instance norm share: torch's parameters and buffers, the mask convention, and the
two ways to normalize (with masked statistics of x, or with the running statistics)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch.nn.modules.batchnorm import _NormBase

from masknorm.functional import Moments, masked_norm_with_moments
from masknorm.modules._frozen_stats import frozen_norm
from masknorm.modules._masks import apply_policy, channel_mask, channel_view
from masknorm.models.padding_context import channel_block_mask
from masknorm._contract import check_affine, check_eps, check_momentum, check_policy, check_positive_int


def bias_kwarg(bias: bool) -> dict:
    """torch's `bias` keyword, passed only when it differs from the default (older torch lacks it)."""
    return {} if bias else {"bias": False}


def check_settings(owner: str, num_features: int, eps: float, momentum: Optional[float]) -> None:
    """The batch and instance norms' constructor arguments (masknorm.modules._validate)."""
    check_positive_int(owner, "num_features", num_features)
    check_eps(owner, eps)
    check_momentum(owner, momentum)


class MaskedRunningNorm(_NormBase):
    """Base of the masked batch and instance norms; state_dict keys and buffers are torch's _NormBase's."""

    _input_dims: Tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float,
        momentum: Optional[float],
        affine: bool,
        track_running_stats: bool,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        *,
        bias: bool = True,
        masked: str = "normalize",
    ) -> None:
        check_settings(type(self).__name__, num_features, eps, momentum)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **bias_kwarg(bias))
        self.masked = check_policy(masked)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, masked={self.masked!r}"

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in self._input_dims:
            expected = " or ".join(f"{d}D" for d in self._input_dims)
            raise ValueError(f"expected {expected} input (got {x.dim()}D input of shape {tuple(x.shape)})")

    def _prepare(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Check x (B, C, *spatial) against num_features; the mask (given, else a padding block's) as (B, 1, *spatial)."""
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"x of shape {tuple(x.shape)} has {x.shape[1]} channels at dim 1, expected num_features={self.num_features}"
            )
        check_affine(type(self).__name__, self.weight, self.bias, (self.num_features,), "num_features")
        return channel_mask(x, channel_block_mask(self, x, mask))

    def _normalize_batch(
        self, x: torch.Tensor, mask: Optional[torch.Tensor], dims: Sequence[int]
    ) -> Tuple[torch.Tensor, Optional[Moments]]:
        """masked_norm over `dims` with this module's eps, affine and policy, and the batch's
        per-group (mean, unbiased variance, count) when the fast path computed them (else None)."""
        lead, trailing = (self.num_features,), x.dim() - 2
        return masked_norm_with_moments(
            x, mask, tuple(dims), eps=self.eps, weight=channel_view(self.weight, lead, trailing),
            bias=channel_view(self.bias, lead, trailing), masked=self.masked,
        )

    def _normalize_running(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """gamma (x - running_mean)/sqrt(running_var + eps) + beta at every position, then the policy.

        Under "keep"/"zero" masked-out values are replaced by 0 before the affine map, so garbage there
        reaches neither the output nor the parameter gradients; under "normalize" it reaches its own
        output position only (and the gradients only where its upstream gradient is not 0).
        """
        inp = x if mask is None or self.masked == "normalize" else torch.where(mask, x, 0)
        out = frozen_norm(inp, self.running_mean, self.running_var, self.weight, self.bias, self.eps)
        return apply_policy(out, x, mask, self.masked)
