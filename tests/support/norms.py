"""Norms the oracle's tests check: torch's layers as the oracle calls them, and known-buggy masked norms."""

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """F.layer_norm over the last axis."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-5)


EPS = 1e-5


def masked_statistics(x: torch.Tensor, mask: torch.Tensor):
    """Zero-filled x, the valid count k and the valid mean over the last axis (NaN where k = 0)."""
    xz = torch.where(mask, x, torch.zeros_like(x))
    k = mask.expand(x.shape).sum(-1, keepdim=True)
    return xz, k, xz.sum(-1, keepdim=True) / k


def eps_outside_sqrt(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mu) / (sqrt(var) + eps) instead of / sqrt(var + eps)."""
    xz, k, mu = masked_statistics(x, mask)
    var = torch.where(mask, (x - mu) ** 2, 0).sum(-1, keepdim=True) / k
    return torch.where(k > 0, (x - mu) / (torch.sqrt(var) + EPS), x)
