"""Normalization with frozen statistics (batch/instance norm in eval mode), safe for garbage padding.

    out = gamma (x - rm) / sqrt(rv + eps) + beta       per channel (axis 1)
    grad x = g gamma / s,   grad gamma = sum_{g != 0} g (x - rm)/s,   grad beta = sum g

The weight gradient leaves out the positions whose upstream gradient is 0, so a NaN or Inf held in
the padding (whose upstream gradient is 0 when the loss ignores it) never reaches it through 0 * NaN;
autograd of torch's batch_norm would sum g * y_hat over every position.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def frozen_norm(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], eps: float,
) -> torch.Tensor:
    """gamma (x - mean)/sqrt(var + eps) + beta with per-channel mean/var (axis 1) and the
    padding-safe weight gradient of the module docstring; where no gradient is recorded, torch's
    fused batch_norm alone (the same forward, one call)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return FrozenNormFunction.apply(x, mean, var, weight, bias, eps)
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


def _channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) tensor shaped to broadcast along x's axis 1."""
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


class FrozenNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps):
        ctx.save_for_backward(x, mean, var, weight)
        ctx.eps = eps
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, g) -> Tuple[Optional[torch.Tensor], ...]:
        x, mean, var, weight = ctx.saved_tensors
        inv_s = _channel(torch.rsqrt(var + ctx.eps), x).to(g.dtype)
        want_x, _, _, want_w, want_b, _ = ctx.needs_input_grad
        reduce = [d for d in range(x.dim()) if d != 1]
        gx = gw = gb = None
        if want_x:
            gx = g * inv_s if weight is None else g * (_channel(weight, x) * inv_s)
        if want_w:
            y_hat = (x - _channel(mean, x)) * inv_s
            gw = torch.where(g != 0, g * y_hat, 0).sum(reduce).to(weight.dtype)
        if want_b:
            gb = g.sum(reduce).to(g.dtype)
        return gx, None, None, gw, gb, None
