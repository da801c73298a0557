"""Masked layer norm and RMS norm: statistics per token over the last len(normalized_shape) axes."""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from masknorm.functional import masked_norm
from masknorm.fast import padded_rows
from masknorm.modules._masks import affine_parameters, token_mask, valid_mask
from masknorm.models.padding_context import token_block_mask
from masknorm._contract import check_affine, check_eps, check_normalized_shape, check_policy

_Shape = Union[int, List[int], torch.Size]

_MASK_DOC = """
    Mask: given, else (mask=None inside `with masknorm.padding(...)`) the block's; one flag per token, x.shape[:-len(normalized_shape)] (the normalized axes are inserted), or
    any bool mask of x's rank that broadcasts to x; None = all valid, and the module equals torch's.
    padding_mask= takes the same mask in torch's padding convention (True = padding, as
    key_padding_mask) instead of mask=; every masknorm module accepts it.
    A token whose flags are all False has no valid value: it passes through unchanged under
    "normalize" and "keep", and is 0 under "zero". With an elementwise mask, masked-out positions
    of a token are normalized with the token's valid statistics ("normalize"), kept ("keep") or 0 ("zero").
"""


def last_axes_norm(
    x: torch.Tensor, mask: Optional[torch.Tensor], normalized_shape: Sequence[int], *, eps: float, center: bool,
    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], masked: str,
) -> torch.Tensor:
    """masked_norm over x's trailing axes, which must equal normalized_shape, with a token mask (one
    kernel call where fast.padded_rows.eager_call takes it)."""
    n = len(normalized_shape)
    if x.dim() < n or tuple(x.shape[x.dim() - n:]) != tuple(normalized_shape):
        raise ValueError(f"x of shape {tuple(x.shape)} does not end with normalized_shape {tuple(normalized_shape)}")
    out = padded_rows.eager_call(x, mask, n, eps, center, weight, bias, masked)
    if out is not None:
        return out
    return masked_norm(x, token_mask(x, mask, n), tuple(range(-n, 0)), eps=eps, center=center,
                       weight=weight, bias=bias, masked=masked)


class MaskedLayerNorm(nn.LayerNorm):
    __doc__ = """Masked nn.LayerNorm: y = gamma (x - mu_V)/sqrt(var_V + eps) + beta over the trailing axes.
""" + _MASK_DOC

    def __init__(self, normalized_shape: _Shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, *,
                 masked: str = "normalize") -> None:
        check_normalized_shape(type(self).__name__, normalized_shape)
        check_eps(type(self).__name__, eps)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.masked = check_policy(masked)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = valid_mask(mask, padding_mask)
        weight, bias = affine_parameters(self)
        check_affine(type(self).__name__, weight, bias, self.normalized_shape, "normalized_shape")
        mask = token_block_mask(self, x, mask, len(self.normalized_shape))
        return last_axes_norm(x, mask, self.normalized_shape, eps=self.eps, center=True,
                              weight=weight, bias=bias, masked=self.masked)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, masked={self.masked!r}"


class MaskedRMSNorm(nn.RMSNorm):
    __doc__ = """Masked nn.RMSNorm: y = gamma x/sqrt(mean_V x^2 + eps) over the trailing axes (eps None: finfo(x.dtype).eps).
""" + _MASK_DOC

    def __init__(self, normalized_shape: _Shape, eps: Optional[float] = None, elementwise_affine: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, *,
                 masked: str = "normalize") -> None:
        check_normalized_shape(type(self).__name__, normalized_shape)
        check_eps(type(self).__name__, eps, allow_none=True)
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.masked = check_policy(masked)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = valid_mask(mask, padding_mask)
        weight, _ = affine_parameters(self, has_bias=False)
        check_affine(type(self).__name__, weight, None, self.normalized_shape, "normalized_shape")
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        mask = token_block_mask(self, x, mask, len(self.normalized_shape))
        return last_axes_norm(x, mask, self.normalized_shape, eps=eps, center=False,
                              weight=weight, bias=None, masked=self.masked)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, masked={self.masked!r}"
