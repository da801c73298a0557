"""Mask conventions of the modules: a mask never carries the channel/feature axis, the module inserts it.

    token mask:   x (*, *normalized_shape), mask (*)           -> mask[..., None, ..., None]
    channel mask: x (B, C, *spatial),       mask (B, *spatial) -> mask[:, None]   ((B, 1, *spatial) as is)

Any size may be 1 (broadcast); a mask that fits no convention is a ValueError naming both shapes.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from masknorm._contract import broadcasts_onto, check_mask_tensor


def valid_mask(mask: Optional[torch.Tensor], padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The modules' mask (True = valid): `mask`, or ~padding_mask for a mask in torch's padding convention
    (True = padding, as key_padding_mask); giving both is a ValueError."""
    if padding_mask is None:
        return mask
    if mask is not None:
        raise ValueError("give mask= (True = valid) or padding_mask= (True = padding), not both")
    check_mask_tensor(padding_mask, "padding_mask", "True = padding")
    return ~padding_mask


def affine_parameters(module: nn.Module, has_bias: bool = True) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(module.weight, module.bias), bias None where not has_bias (nn.RMSNorm has none): each read from
    module._parameters where it is there (a dict lookup, not nn.Module.__getattr__'s search), else as an
    attribute (a parametrized or replaced parameter is a property or a plain attribute)."""
    params = module._parameters
    weight = params["weight"] if "weight" in params else module.weight
    if not has_bias:
        return weight, None
    return weight, params["bias"] if "bias" in params else module.bias


def token_mask(x: torch.Tensor, mask: Optional[torch.Tensor], n_normalized: int) -> Optional[torch.Tensor]:
    """Mask in x's rank for normalization over x's last `n_normalized` axes.

    mask (*) with x (*, *normalized_shape): one flag per token; or a mask of x's rank that broadcasts to x.
    """
    if mask is None:
        return None
    check_mask_tensor(mask)
    lead = tuple(x.shape[: x.dim() - n_normalized])
    if mask.dim() == len(lead) and broadcasts_onto(mask.shape, lead):
        return mask.reshape(tuple(mask.shape) + (1,) * n_normalized)
    if mask.dim() == x.dim() and broadcasts_onto(mask.shape, x.shape):
        return mask
    raise ValueError(
        f"mask of shape {tuple(mask.shape)} fits no convention for x of shape {tuple(x.shape)}: "
        f"expected one flag per token {lead}, or a mask of x's rank that broadcasts to x"
    )


def channel_mask(x: torch.Tensor, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Mask of shape (B, 1, *spatial) for x (B, C, *spatial), from (B, *spatial) or (B, 1, *spatial)."""
    if mask is None:
        return None
    check_mask_tensor(mask)
    no_channel = (x.shape[0],) + tuple(x.shape[2:])
    if mask.dim() == x.dim() - 1 and broadcasts_onto(mask.shape, no_channel):
        return mask.unsqueeze(1)
    if mask.dim() == x.dim() and mask.shape[1] == 1 and broadcasts_onto(mask.shape, x.shape):
        return mask
    raise ValueError(
        f"mask of shape {tuple(mask.shape)} fits no convention for x of shape {tuple(x.shape)}: "
        f"expected (B, *spatial) = {no_channel} or (B, 1, *spatial); a mask never carries the channel axis"
    )


def apply_policy(out: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor], masked: str) -> torch.Tensor:
    """out at valid positions; at masked-out ones out ("normalize"), x ("keep") or 0 ("zero")."""
    if mask is None or masked == "normalize":
        return out
    return torch.where(mask, out, x if masked == "keep" else torch.zeros((), dtype=out.dtype, device=out.device))


def channel_view(param: Optional[torch.Tensor], lead: Sequence[int], trailing: int) -> Optional[torch.Tensor]:
    """A per-channel parameter reshaped to `lead` followed by `trailing` singleton axes."""
    return None if param is None else param.reshape(tuple(lead) + (1,) * trailing)
