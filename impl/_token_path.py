"""Fast path: layer norm over trailing axes with one validity flag per group (padded tokens).

When the mask is constant along the reduced axes, every group is either fully valid (plain layer
norm) or fully masked (degenerate: passed through). torch's fused kernels then do the work:

    forward:  y, mu, rstd = native_layer_norm(x);  out = where(P, y, x or 0)
    backward: dx = native_layer_norm_backward(where(P, dy, 0), where(mask, x, 0), ...);
              dx = where(P, dx, dy or 0)

A padded group's garbage stays in its own row of the fused kernel and is then replaced. Valid
groups whose rstd leaves the range where the fused kernel is accurate (overflow or underflow of
squares, a constant group with eps = 0, kappa beyond 1/(4u)) are redone with the general
statistics; whether there are any is a Python-level check (a host sync), so this path runs in
eager mode only.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from masknorm._autograd import affine, compose, general_vjp, masked_norm_jvp, masked_norm_vjp, normalized, regions
from masknorm._stats import GroupStats, group_stats, where_or_zero

# rstd in [2^-40, 2^40] keeps n * var within range for any realistic n in float32 and float64.
_SAFE_RSTD = (2.0**-40, 2.0**40)


def applies(
    x: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    dims: Sequence[int],
    correction: int,
    center: bool,
) -> bool:
    """True for a layer norm over trailing axes with one mask flag per group, in eager mode.

    Under torch.compile and torch.func transforms the general path runs (its Python-level
    safety check would be a graph break / a data-dependent branch there).
    """
    nd = x.dim()
    nshape = tuple(x.shape[nd - len(dims):])
    return (
        center
        and correction == 0
        and x.dtype in (torch.float32, torch.float64)
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and tuple(dims) == tuple(range(nd - len(dims), nd))
        and (mask is None or all(mask.shape[d] == 1 for d in dims))
        and all(t is None or (tuple(t.shape) == nshape and t.dtype == x.dtype) for t in (weight, bias))
    )


def _rows(t: torch.Tensor, ndims: int) -> torch.Tensor:
    """t as (groups, group size): one row per group."""
    return t.reshape(-1, math.prod(t.shape[t.dim() - ndims:]))


def _forward(xc, mask, weight, bias, ndims, eps, masked) -> Tuple[torch.Tensor, GroupStats]:
    """(out, stats) via torch's fused layer norm; a padded group's own NaNs stay in its row, which
    is then overwritten with x (or 0 under "zero") by row index, not by a full-size where."""
    nshape = tuple(xc.shape[xc.dim() - ndims:])
    y, mean, rstd = torch.native_layer_norm(xc, nshape, weight, bias, eps)
    valid = torch.ones_like(mean, dtype=torch.bool) if mask is None else mask.expand(mean.shape)
    k = valid.to(xc.dtype) * float(math.prod(nshape))
    st = GroupStats(torch.ones_like(mean), mean, rstd, rstd, k, k, ~valid)
    if mask is not None:
        padded = (~valid).flatten().nonzero().squeeze(1)
        if masked == "zero":
            _rows(y, ndims).index_fill_(0, padded, 0)
        else:
            _rows(y, ndims).index_copy_(0, padded, _rows(xc, ndims).index_select(0, padded))
    return y, st


def _fused_backward(g_out, x, weight, st, ndims, masked, want):
    """(grad x, grad weight, grad bias) when every group is valid (fused) or padded (passed through):
    torch's fused backward on the valid rows only, gathered and scattered by row index, so
    whatever padded rows hold never meets a multiplication."""
    g2, x2 = _rows(g_out, ndims), _rows(x, ndims)
    valid = ~st.degenerate.flatten()
    rows, padded = valid.nonzero().squeeze(1), (~valid).nonzero().squeeze(1)
    compact = padded.numel() > 0
    gv, xv = (g2.index_select(0, rows), x2.index_select(0, rows)) if compact else (g2, x2)
    mean, rstd = st.shift_scaled.reshape(-1, 1), st.inv_s.reshape(-1, 1)
    if compact:
        mean, rstd = mean.index_select(0, rows), rstd.index_select(0, rows)
    w = None if weight is None else weight.reshape(-1)
    gxv, gw, _ = torch.ops.aten.native_layer_norm_backward(
        gv, xv, [x2.shape[1]], mean, rstd, w, None, [want[0], want[2], False]
    )
    gb = gv.sum(0) if want[3] else None
    gx = None
    if want[0]:
        gx = gxv
        if compact:
            gx = torch.empty_like(g2).index_copy_(0, rows, gxv)
            if masked == "zero":
                gx.index_fill_(0, padded, 0)
            else:
                gx.index_copy_(0, padded, g2.index_select(0, padded))
        gx = gx.reshape(g_out.shape)
    return gx, (None if gw is None else gw.reshape(weight.shape)), gb


def _inaccurate(st: GroupStats) -> torch.Tensor:
    """Valid groups where the fused kernel is not accurate: rstd out of range, or kappa ~ |mu| rstd
    above 1/(4u) (measured: error <= 3 u*kappa up to kappa u = 0.67 in float32; at kappa u ~ 1.4,
    sigma ~ one ulp of mu, the fused variance is lost)."""
    r = st.inv_s
    kappa_limit = 0.5 / torch.finfo(r.dtype).eps  # 1/(4u)
    in_range = (r >= _SAFE_RSTD[0]) & (r <= _SAFE_RSTD[1]) & (st.shift_scaled.abs() * r <= kappa_limit)
    return ~st.degenerate & ~in_range


class TokenLayerNormFunction(torch.autograd.Function):
    """The fused-kernel twin of MaskedNormFunction.

    Groups where the fused kernel is inaccurate are redone with the general statistics (a host
    sync decides whether any are); every group's result depends on its own values only.
    """

    @staticmethod
    def forward(ctx, x, mask, weight, bias, ndims, eps, masked):
        dims = tuple(range(x.dim() - ndims, x.dim()))
        out, st = _forward(x, mask, weight, bias, ndims, eps, masked)
        redo = _inaccurate(st)
        if bool(redo.any()):
            general = group_stats(x, mask, dims, 0, eps, True)
            st = GroupStats(*(torch.where(redo, g, f) for g, f in zip(general, st)))
            P, passthrough = regions(mask, st.degenerate, masked)
            out = torch.where(redo, compose(affine(normalized(x, st), weight, bias), x, P, passthrough, masked), out)
        else:
            redo = None
        ctx.config = (dims, 0, eps, True, masked)
        ctx.bias_shape = None if bias is None else (bias.shape, bias.dtype)
        ctx.save_for_backward(x, mask, weight, redo, *st)
        ctx.save_for_forward(x, mask, weight, *st)
        return out

    @staticmethod
    def backward(ctx, g_out):
        x, mask, weight, redo, *saved = ctx.saved_tensors
        dims, masked = ctx.config[0], ctx.config[4]
        want = ctx.needs_input_grad
        if torch.is_grad_enabled():
            gx, gw, gb = general_vjp(g_out, x, mask, weight, ctx.bias_shape, ctx.config, want)
            return gx, None, gw, gb, None, None, None
        st = GroupStats(*saved)
        if redo is None:
            gx, gw, gb = _fused_backward(g_out, x, weight, st, len(dims), masked, want)
            return gx, None, gw, (None if gb is None else gb.reshape(ctx.bias_shape[0])), None, None, None
        x_clean = x if mask is None else where_or_zero(mask, x)
        P, passthrough = regions(mask, st.degenerate, masked)
        fused = P if redo is None else P & ~redo
        nshape = list(x_clean.shape[x_clean.dim() - len(dims):])
        g_p = where_or_zero(fused, g_out)
        gx, gw, _ = torch.ops.aten.native_layer_norm_backward(
            g_p, x_clean, nshape, where_or_zero(fused, st.shift_scaled), where_or_zero(fused, st.inv_s), weight, None,
            [True, want[2], False],
        )
        lead = list(range(g_p.dim() - len(dims)))
        gb = (g_p.sum(lead) if lead else g_p) if want[3] else None
        gx = compose(gx, g_out, P, passthrough, masked)
        if redo is not None:
            gx_r, gw_r, gb_r = masked_norm_vjp(where_or_zero(redo, g_out), x, mask, weight, st, dims, True, masked,
                                               want[2], want[3])
            gx = torch.where(redo, gx_r, gx)
            gw = None if gw is None else gw + gw_r.sum_to_size(gw.shape)
            gb = None if gb is None else gb + gb_r.sum_to_size(gb.shape)
        return (gx if want[0] else None), None, gw, gb, None, None, None

    @staticmethod
    def jvp(ctx, x_dot, _mask_dot, weight_dot, bias_dot, *_config_dots):
        x, mask, weight, *saved = ctx.saved_tensors
        dims, _, _, _, masked = ctx.config
        st = GroupStats(*saved)
        return masked_norm_jvp(x, x_dot, mask, weight, weight_dot, bias_dot, st, dims, True, masked)
