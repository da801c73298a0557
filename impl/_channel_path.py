"""Fast path: batch norm layout (N, C, *S) reduced over every axis but C, mask varying freely.

Statistics per channel from two masked reductions, then torch's fused inference kernels:

    d = where(mask, x, 0) - mu * mask,   mu = sum_V x / k,   var = |d|^2 / nu
    forward:  out = batch_norm_eval(x; mu, var, gamma, beta, eps)       (then the policy fix-up)
    backward: dx, B, A = batch_norm_eval_backward(g_P, x);   A = sum_P g_out, B = sum_P g_out y_hat
              gx = dx - mask * gamma/s * (A/k + y_hat * B/nu)         (the closed-form VJP)

Garbage at masked-out positions never enters a reduction (where, not multiplication); in the
backward, x is replaced by mu wherever the upstream gradient is 0, so such a position adds
exactly 0 whatever it holds, and the mask term is applied with where.
Eager mode only: a Python-level check (a host sync) sends calls whose statistics leave the
exact range (overflow, underflow, degenerate channels) to the general path, and eps = 0 always
goes there (its exact constant-group test needs the general path's shifted statistics).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from masknorm._autograd import compose, general_vjp, masked_norm_jvp, regions
from masknorm._stats import GroupStats, valid_count, where_or_zero


def applies(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    dims: Sequence[int],
    eps: float,
    center: bool,
) -> bool:
    """True for a centered norm with eps > 0 over every axis but axis 1, per-channel affine, eager."""
    nd = x.dim()
    per_channel = [1] * nd
    if nd >= 2:
        per_channel[1] = x.shape[1]
    return (
        center
        and eps > 0
        and nd >= 2
        and x.dtype in (torch.float32, torch.float64)
        and tuple(dims) == tuple(d for d in range(nd) if d != 1)
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and all(t is None or (t.dtype == x.dtype and t.numel() == x.shape[1]
                              and [1] * (nd - t.dim()) + list(t.shape) == per_channel) for t in (weight, bias))
    )


def _statistics(x: torch.Tensor, mask: Optional[torch.Tensor], dims, correction: int, eps: float):
    """(var, stats, safe) per channel; safe is a Python bool (host sync)."""
    k = valid_count(mask, x.shape, dims, x.dtype).to(x.device)
    nu = k - correction
    d = x.clone() if mask is None else where_or_zero(mask, x)
    mu = d.sum(dims, keepdim=True) / k
    if mask is None:
        d.sub_(mu)
    else:
        d.addcmul_(mask.to(x.dtype), mu, value=-1)
    var = torch.linalg.vector_norm(d, 2, dims, keepdim=True).square_() / nu
    info = torch.finfo(x.dtype)
    in_range = (var < info.max / 16) & ((var > info.tiny * 2.0**64) | (var <= eps * info.eps))
    safe = bool((torch.isfinite(mu) & in_range & (nu > 0)).all())
    k, nu = k.expand_as(mu), nu.expand_as(mu)
    inv_s = torch.rsqrt(var + eps)
    st = GroupStats(torch.ones_like(mu), mu, inv_s, inv_s, k, nu, torch.zeros_like(mu, dtype=torch.bool))
    return var, st, safe


class ChannelNormFunction(torch.autograd.Function):
    """The fused-kernel twin of MaskedNormFunction for the batch-norm layout; returns (out, ok)."""

    @staticmethod
    def forward(ctx, x, mask, weight, bias, dims, correction, eps, masked):
        var, st, ok = _statistics(x, mask, dims, correction, eps)
        w = None if weight is None else weight.flatten()
        b = None if bias is None else bias.flatten()
        y = torch.batch_norm(x, w, b, st.shift_scaled.flatten(), var.flatten(), False, 0.0, eps, False)
        P, passthrough = regions(mask, st.degenerate, masked)
        out = y if mask is None or masked == "normalize" else compose(y, x, P, passthrough, masked)
        ctx.config = (tuple(dims), correction, eps, True, masked)
        ctx.bias_shape = None if bias is None else (bias.shape, bias.dtype)
        ctx.save_for_backward(x, mask, weight, var, *st)
        ctx.save_for_forward(x, mask, weight, *st)
        return out, ok

    @staticmethod
    def backward(ctx, g_out, _g_ok):
        x, mask, weight, var, *saved = ctx.saved_tensors
        masked = ctx.config[4]
        want = ctx.needs_input_grad
        if torch.is_grad_enabled():
            gx, gw, gb = general_vjp(g_out, x, mask, weight, ctx.bias_shape, ctx.config, want)
            return gx, None, gw, gb, None, None, None, None
        st = GroupStats(*saved)
        P, passthrough = regions(mask, st.degenerate, masked)
        g_p = g_out if mask is None or masked == "normalize" else where_or_zero(P, g_out)
        mu, inv_s = st.shift_scaled, st.inv_s
        # Where the upstream gradient is 0, x's value must not matter (0 * inf = NaN): use mu there.
        x_g = x if mask is None else torch.where(g_p == 0, mu, x)
        w = None if weight is None else weight.flatten()
        dx, sum_gy, sum_g = torch.ops.aten.native_batch_norm_backward(
            g_p, x_g, w, mu.flatten(), var.flatten(), None, None, False, ctx.config[2], [True, True, True],
        )
        gamma_s = inv_s if weight is None else inv_s * weight.reshape(inv_s.shape)
        sum_g, sum_gy = sum_g.reshape(mu.shape), sum_gy.reshape(mu.shape)
        beta = gamma_s * inv_s * sum_gy / st.nu
        alpha = gamma_s * sum_g / st.k - beta * mu
        correction = torch.addcmul(alpha, x, beta)
        gx = dx.sub_(correction) if mask is None else torch.where(mask, dx - correction, dx)
        if mask is not None and masked != "normalize":
            gx = compose(gx, g_out, P, passthrough, masked)
        gw = sum_gy.reshape(weight.shape) if want[2] else None
        gb = sum_g.reshape(ctx.bias_shape[0]) if want[3] else None
        return (gx if want[0] else None), None, gw, gb, None, None, None, None

    @staticmethod
    def jvp(ctx, x_dot, _mask_dot, weight_dot, bias_dot, *_config_dots):
        x, mask, weight, *saved = ctx.saved_tensors
        dims, masked = ctx.config[0], ctx.config[4]
        return masked_norm_jvp(x, x_dot, mask, weight, weight_dot, bias_dot, GroupStats(*saved), dims, True, masked), None
