"""Triton kernels for the strided-group layouts of masknorm.fast.group_views: group and instance norm
(a mask flag per (sample, position)), layer/RMS norm with a mask that varies inside the rows, and
batch norm's per-channel statistics with any mask. Imported only by masknorm.fast.backend when a
call runs on them (this module imports triton); on CPU tensors they run under Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported).

One program per group, looping over its O x I elements in blocks. The statistics are the general
path's (masknorm._stats.group_stats), in float32 for float16/bfloat16 and in x's dtype otherwise,
with m the mask, k = sum m, nu = k - c:

    a = 2^e, e = floor(log2 max_V |x|) + 1 clamped,  xs = x/a,  c0 = xs at the first valid position
    mu' = c0 + (1/k) sum_V (xs - c0),   var' = sum_V (xs - mu')^2 / nu,   y_hat = (xs - mu') / sqrt(var' + eps/a^2)

(RMS: mu' = 0.) A group with no spread (sum of squares exactly 0) is normalized unscaled,
(x - mu)/sqrt(eps); a degenerate group (nu <= 0, or eps = 0 and no spread) passes x through. Each
masked-out value is replaced by 0 with `where` before any arithmetic, so whatever it holds (NaN,
Inf) enters no statistic: garbage padding gives the bits of clean padding. Outputs by policy:
P = every position of a normalized group ("normalize") or its valid ones; elsewhere x ("keep",
and degenerate groups) or 0 ("zero": 0 at masked-out positions).

Backward, the closed form of masknorm.spec.closed_forms with g = gamma dy over P_used (P without
the masked-out positions whose dy is 0 under "normalize", so their garbage x is never read):

    dx = (a/s) [g - m y_hat (sum g y_hat)/nu - m (sum g)/k] / a    on P (RMS: without the last term)
    dx = dy where x passes through, 0 elsewhere ("zero")
    dgamma, dbeta = sums of dy y_hat, dy over P_used, per group here and over groups by the caller

The batch's per-group mean, unbiased variance and count come out too (batch norm's running
statistics): mu, sum_V (x - mu)^2 / max(k - 1, 1), k, in the computation dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from masknorm._autograd import compute_dtype, general_vjp, needs_general_backward, saved_jvp
from masknorm._stats import GroupStats, exponent_bounds
from masknorm.fast.group_views import PER_GROUP, PER_I, PER_O, GroupView
from masknorm.fast.triton_padded_rows import _ACC, _bf16_by_hand, _div, _normal_exponent, _rounded, _sqrt

BLOCK = 1024  # elements per block of a group (BO x BI)
_POLICY = {"normalize": 0, "keep": 1, "zero": 2}
_NORMALIZE, _KEEP, _ZERO = 0, 1, 2
_STATS = 7  # rows of the per-group statistics: scale, shift_scaled, inv_s_scaled, inv_s, k, mu, ss


@triton.jit
def _block(X, M, x_base, m_base, o0, i0, O, I, xo, mo, mi, HAS_MASK: tl.constexpr, BO: tl.constexpr,
           BI: tl.constexpr):
    """(offsets of x, o, i, inside, valid, x as stored) of the block at (o0, i0) of a group."""
    o = o0 + tl.arange(0, BO).to(tl.int64)
    i = i0 + tl.arange(0, BI).to(tl.int64)
    inside = (o[:, None] < O) & (i[None, :] < I)
    offsets = x_base + o[:, None] * xo + i[None, :]
    x_raw = tl.load(X + offsets, mask=inside, other=0.0)
    valid = inside
    if HAS_MASK:
        flags = tl.load(M + m_base + o[:, None] * mo + i[None, :] * mi, mask=inside, other=0)
        valid = inside & (flags != 0)
    return offsets, o, i, inside, valid, x_raw


@triton.jit
def _group_base(pid, G, xb, xg, mb, mg):
    """(x offset, mask offset, g) of group pid = b G + g."""
    b = tl.cast(pid // G, tl.int64)
    g = tl.cast(pid % G, tl.int64)
    return b * xb + g * xg, b * mb + g * mg, g


@triton.jit
def _statistics(X, M, P, x_base, m_base, O, I, xo, mo, mi, CENTER: tl.constexpr, HAS_MASK: tl.constexpr,
                ACC: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    """(scale, shift, inv_s, inv_s true, k, nu, degenerate, mu, ss) of one group: y_hat = (x scale - shift) inv_s.
    P holds (eps, 1/sqrt(eps) or 0, c, lo, hi) in ACC: e is clamped to [lo, hi]."""
    eps = tl.load(P)
    amax = tl.zeros([], dtype=ACC)
    count = tl.zeros([], dtype=tl.int64)
    first = tl.full([], 2**62, tl.int64)
    c0_x = tl.zeros([], dtype=ACC)
    for o0 in range(0, O, BO):
        for i0 in range(0, I, BI):
            _, o, i, inside, valid, x_raw = _block(X, M, x_base, m_base, o0, i0, O, I, xo, mo, mi, HAS_MASK, BO, BI)
            x = tl.where(valid, x_raw.to(ACC), 0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x)))
            count += tl.sum(valid.to(tl.int64))
            index = tl.where(valid, o[:, None] * I + i[None, :], 2**62)
            at = tl.min(index)
            value = tl.sum(tl.where(index == at, x, 0.0))
            c0_x = tl.where(at < first, value, c0_x)
            first = tl.minimum(first, at)
    k = count.to(ACC)
    k_safe = tl.where(count > 0, k, 1.0)
    nu = k - tl.load(P + 2)
    e = tl.where(amax > 0, tl.floor(tl.log2(tl.where(amax > 0, amax, 1.0))) + 1, tl.load(P + 3))
    e = tl.minimum(tl.maximum(e, tl.load(P + 3)), tl.load(P + 4))
    inv_a = tl.exp2(-e)
    c0 = c0_x * inv_a
    shift = tl.zeros([], dtype=ACC)
    if CENTER:
        total = tl.zeros([], dtype=ACC)
        for o0 in range(0, O, BO):
            for i0 in range(0, I, BI):
                _, o, i, inside, valid, x_raw = _block(X, M, x_base, m_base, o0, i0, O, I, xo, mo, mi, HAS_MASK, BO,
                                                       BI)
                total += tl.sum(tl.where(valid, tl.where(valid, x_raw.to(ACC), 0.0) * inv_a - c0, 0.0))
        shift = _div(total, k_safe, ACC)
    ss = tl.zeros([], dtype=ACC)
    for o0 in range(0, O, BO):
        for i0 in range(0, I, BI):
            _, o, i, inside, valid, x_raw = _block(X, M, x_base, m_base, o0, i0, O, I, xo, mo, mi, HAS_MASK, BO, BI)
            xs = tl.where(valid, x_raw.to(ACC), 0.0) * inv_a  # padding selected away before any arithmetic
            if CENTER:
                d = tl.where(valid, (xs - c0) - shift, 0.0)
            else:
                d = tl.where(valid, xs, 0.0)
            ss += tl.sum(d * d)
    if CENTER:
        mu_s = c0 + shift
        mu = c0_x + shift * tl.exp2(e)
    else:
        mu_s = tl.zeros([], dtype=ACC)
        mu = mu_s
    constant = ss == 0
    degenerate = (nu <= 0) | ((eps == 0) & constant)
    var_s = tl.where(degenerate | constant, 1.0, _div(ss, tl.where(degenerate, 1.0, nu), ACC))
    inv_s_scaled = _div(tl.full([], 1.0, ACC), _sqrt(var_s + eps * inv_a * inv_a, ACC), ACC)
    inv_s = tl.where(constant, tl.load(P + 1), inv_s_scaled)
    scale = tl.where(constant, 1.0, inv_a)
    return scale, tl.where(constant, mu, mu_s), inv_s, inv_s * scale, k, nu, degenerate, mu, ss


@triton.jit
def _forward_kernel(X, M, W, B, P, Y, STATS, DEGENERATE, n_groups, G, O, I, xb, xg, xo, mb, mg, mo, mi, wg, wo, wi,
                    CENTER: tl.constexpr, POLICY: tl.constexpr, HAS_MASK: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, ACC: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
                    BF16_BY_HAND: tl.constexpr):
    pid = tl.program_id(0)
    x_base, m_base, g = _group_base(pid, G, xb, xg, mb, mg)
    scale, shift, inv_s, inv_s_true, k, nu, degenerate, mu, ss = _statistics(
        X, M, P, x_base, m_base, O, I, xo, mo, mi, CENTER, HAS_MASK, ACC, BO, BI)
    for o0 in range(0, O, BO):
        for i0 in range(0, I, BI):
            offsets, o, i, inside, valid, x_raw = _block(X, M, x_base, m_base, o0, i0, O, I, xo, mo, mi, HAS_MASK,
                                                         BO, BI)
            y = (x_raw.to(ACC) * scale - shift) * inv_s
            w_at = g * wg + o[:, None] * wo + i[None, :] * wi
            if HAS_W:
                y = y * tl.load(W + w_at, mask=inside, other=0.0).to(ACC)
            if HAS_B:
                y = y + tl.load(B + w_at, mask=inside, other=0.0).to(ACC)
            tl.store(Y + offsets, _by_policy(_rounded(y, x_raw, BF16_BY_HAND), x_raw, inside, valid, degenerate, POLICY),
                     mask=inside)
    tl.store(STATS + pid, scale)
    tl.store(STATS + n_groups + pid, shift)
    tl.store(STATS + 2 * n_groups + pid, inv_s)
    tl.store(STATS + 3 * n_groups + pid, inv_s_true)
    tl.store(STATS + 4 * n_groups + pid, k)
    tl.store(STATS + 5 * n_groups + pid, mu)
    tl.store(STATS + 6 * n_groups + pid, ss)
    tl.store(DEGENERATE + pid, degenerate.to(tl.int8))


@triton.jit
def _by_policy(normalized, raw, inside, valid, degenerate, POLICY: tl.constexpr):
    """The output (forward) or gradient (backward) by policy: `normalized` on P, `raw` (x or dy) where
    x passes through, 0 elsewhere ("zero" at masked-out positions)."""
    fused = degenerate.to(tl.int8) == 0
    if POLICY == 0:
        return tl.where(inside & fused, normalized, raw)
    if POLICY == 1:
        return tl.where(valid & fused, normalized, raw)
    return tl.where(valid & fused, normalized, tl.where(valid, raw, tl.zeros_like(raw)))


@triton.jit
def _backward_terms(DY, X, M, W, x_base, m_base, g, o0, i0, O, I, xo, mo, mi, wg, wo, wi, scale, shift, inv_s,
                    degenerate, POLICY: tl.constexpr, HAS_MASK: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
                    BO: tl.constexpr, BI: tl.constexpr):
    """(offsets, i, inside, valid, dy as stored, y_hat, dy, gamma dy) of a block, y_hat and dy zeroed
    outside P_used: the positions of a normalized group that enter the sums, every position under
    "normalize" except the masked-out ones whose dy is 0 (their x is not read), the valid ones otherwise."""
    offsets, o, i, inside, valid, x_raw = _block(X, M, x_base, m_base, o0, i0, O, I, xo, mo, mi, HAS_MASK, BO, BI)
    dy_raw = tl.load(DY + offsets, mask=inside, other=0.0)
    used = valid
    if POLICY == 0:
        used = inside & (valid | (dy_raw != 0))
    used = used & (degenerate.to(tl.int8) == 0)
    y_hat = tl.where(used, (tl.where(used, x_raw.to(ACC), 0.0) * scale - shift) * inv_s, 0.0)
    dy = tl.where(used, dy_raw.to(ACC), 0.0)
    gw = dy
    if HAS_W:
        gw = dy * tl.load(W + g * wg + o[:, None] * wo + i[None, :] * wi, mask=inside, other=0.0).to(ACC)
    return offsets, i, inside, valid, dy_raw, y_hat, dy, gw


@triton.jit
def _backward_kernel(DY, X, M, W, STATS, DEGENERATE, P, DX, DW, DB, n_groups, G, O, I, xb, xg, xo, mb, mg, mo, mi, wg,
                     wo, wi, CENTER: tl.constexpr, POLICY: tl.constexpr, HAS_MASK: tl.constexpr, HAS_W: tl.constexpr,
                     PARTIAL: tl.constexpr, ACC: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
                     BF16_BY_HAND: tl.constexpr):
    pid = tl.program_id(0)
    x_base, m_base, g = _group_base(pid, G, xb, xg, mb, mg)
    scale = tl.load(STATS + pid)
    shift = tl.load(STATS + n_groups + pid)
    inv_s = tl.load(STATS + 2 * n_groups + pid)
    degenerate = tl.load(DEGENERATE + pid) != 0
    k = tl.where(degenerate, 1.0, tl.load(STATS + 4 * n_groups + pid))
    nu = tl.where(degenerate, 1.0, k - tl.load(P + 2))
    sum_g = tl.zeros([], dtype=ACC)
    sum_gy = tl.zeros([], dtype=ACC)
    for o0 in range(0, O, BO):
        for i0 in range(0, I, BI):
            offsets, i, inside, valid, dy_raw, y_hat, dy, gw = _backward_terms(
                DY, X, M, W, x_base, m_base, g, o0, i0, O, I, xo, mo, mi, wg, wo, wi, scale, shift, inv_s, degenerate,
                POLICY, HAS_MASK, HAS_W, ACC, BO, BI)
            sum_g += tl.sum(gw)
            sum_gy += tl.sum(gw * y_hat)
    total_w = tl.zeros([], dtype=ACC)
    total_b = tl.zeros([], dtype=ACC)
    for o0 in range(0, O, BO):
        row_w = tl.zeros([BO], dtype=ACC)
        row_b = tl.zeros([BO], dtype=ACC)
        for i0 in range(0, I, BI):
            offsets, i, inside, valid, dy_raw, y_hat, dy, gw = _backward_terms(
                DY, X, M, W, x_base, m_base, g, o0, i0, O, I, xo, mo, mi, wg, wo, wi, scale, shift, inv_s, degenerate,
                POLICY, HAS_MASK, HAS_W, ACC, BO, BI)
            core = gw - tl.where(valid, y_hat * _div(sum_gy, nu, ACC), 0.0)
            if CENTER:
                core = core - tl.where(valid, _div(sum_g, k, ACC), 0.0)
            dx = _rounded(inv_s * core * scale, dy_raw, BF16_BY_HAND)
            tl.store(DX + offsets, _by_policy(dx, dy_raw, inside, valid, degenerate, POLICY), mask=inside)
            if PARTIAL == 2:
                tl.store(DW + tl.cast(pid, tl.int64) * I + i, tl.sum(dy * y_hat, axis=0), mask=i < I)
                tl.store(DB + tl.cast(pid, tl.int64) * I + i, tl.sum(dy, axis=0), mask=i < I)
            else:
                row_w += tl.sum(dy * y_hat, axis=1)
                row_b += tl.sum(dy, axis=1)
        if PARTIAL == 1:
            rows = o0 + tl.arange(0, BO)
            tl.store(DW + tl.cast(pid, tl.int64) * O + rows, row_w, mask=rows < O)
            tl.store(DB + tl.cast(pid, tl.int64) * O + rows, row_b, mask=rows < O)
        total_w += tl.sum(row_w)
        total_b += tl.sum(row_b)
    if PARTIAL == 0:
        tl.store(DW + pid, total_w)
        tl.store(DB + pid, total_b)




def _blocks(view: GroupView) -> Tuple[int, int]:
    """(BO, BI): BI covers the inner run up to BLOCK, BO the rest of the block."""
    bi = min(triton.next_power_of_2(view.I), BLOCK)
    return min(triton.next_power_of_2(view.O), max(1, BLOCK // bi)), bi


def _params(ct: torch.dtype, eps: float, correction: int, device: torch.device) -> torch.Tensor:
    """The kernels' P: (eps, 1/sqrt(eps) or 0, c, lo, hi) in the computation dtype; e in [lo, hi]
    keeps 1/a = 2^-e normal and eps/a^2 finite."""
    lo, hi = exponent_bounds(ct, eps)
    return torch.tensor([eps, eps**-0.5 if eps > 0 else 0.0, correction, lo, min(hi, _normal_exponent(ct))],
                        dtype=ct, device=device)


def _geometry(view: GroupView, mask: Optional[torch.Tensor], x2: torch.Tensor):
    """(mask tensor or x2 as a placeholder, the integer arguments of both kernels)."""
    if mask is None:
        m, (mb, mg, mo, mi) = x2, (0, 0, 0, 0)
    else:
        m, (mb, mg, mo, mi) = view.mask_view(mask)
    return m, (view.groups, view.G, view.O, view.I, *view.x_strides, mb, mg, mo, mi, *view.param_strides)


def forward(x: torch.Tensor, mask: Optional[torch.Tensor], weight, bias, view: GroupView, correction: int, eps: float,
            center: bool, masked: str) -> Tuple[torch.Tensor, GroupStats, Tuple[torch.Tensor, ...]]:
    """(out in x's dtype, GroupStats in keepdim shape and x's computation dtype, the batch's
    (mean, unbiased variance, count) per group in keepdim shape)."""
    ct = compute_dtype(x.dtype)
    x2 = x.contiguous()
    y = torch.empty_like(x2)
    n = view.groups
    stats = torch.empty(_STATS, n, dtype=ct, device=x.device)
    degenerate = torch.empty(n, dtype=torch.int8, device=x.device)
    w, b = view.parameter(weight), view.parameter(bias)
    m, geometry = _geometry(view, mask, x2)
    bo, bi = _blocks(view)
    _forward_kernel[(n,)](
        x2, m, x2 if w is None else w, x2 if b is None else b, _params(ct, eps, correction, x.device), y, stats,
        degenerate, *geometry, CENTER=center, POLICY=_POLICY[masked], HAS_MASK=mask is not None,
        HAS_W=w is not None, HAS_B=b is not None, ACC=_ACC[ct], BO=bo, BI=bi, BF16_BY_HAND=_bf16_by_hand(x.dtype),
    )
    keep = view.keepdim()
    scale, shift, inv_s, inv_s_true, k, mu, ss = (t.view(keep) for t in stats)
    st = GroupStats(scale, shift, inv_s, inv_s_true, k, k - correction, degenerate.view(keep).bool())
    ratio = 1 / scale.double()  # a, or 1 where the group has no spread (ss = 0)
    var = (ss.double() / (k.double() - 1).clamp(min=1) * ratio * ratio).to(ct)
    return y.view(x.shape), st, (mu, var, k)


def backward(g_out: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor], weight, bias_shape, st: GroupStats,
             view: GroupView, correction: int, center: bool, masked: str, want_w: bool, want_b: bool):
    """(grad x, grad weight, grad bias) in x's dtype and the parameters' dtypes and shapes (bias_shape:
    (shape, dtype) or None); None for a parameter gradient not wanted."""
    ct = compute_dtype(x.dtype)
    x2 = x.contiguous()
    n = view.groups
    w = view.parameter(weight)
    width = {PER_GROUP: 1, PER_O: view.O, PER_I: view.I}[view.partial]
    dw, db = (torch.empty(n, width, dtype=ct, device=x.device) for _ in range(2))
    dx = torch.empty_like(x2)
    stats = torch.stack([t.reshape(-1).to(ct) for t in (st.scale, st.shift_scaled, st.inv_s_scaled, st.inv_s, st.k)])
    m, geometry = _geometry(view, mask, x2)
    bo, bi = _blocks(view)
    _backward_kernel[(n,)](
        g_out.contiguous(), x2, m, x2 if w is None else w, stats, st.degenerate.reshape(-1).to(torch.int8),
        _params(ct, 0.0, correction, x.device), dx, dw, db, *geometry, CENTER=center, POLICY=_POLICY[masked],
        HAS_MASK=mask is not None, HAS_W=w is not None, PARTIAL=view.partial, ACC=_ACC[ct], BO=bo, BI=bi,
        BF16_BY_HAND=_bf16_by_hand(x.dtype),
    )
    gw = view.parameter_grad(dw, weight.shape, weight.dtype) if want_w and weight is not None else None
    gb = view.parameter_grad(db, *bias_shape) if want_b and bias_shape is not None else None
    return dx.view(x.shape), gw, gb


class TritonGroupNormFunction(torch.autograd.Function):
    """masked_norm on the Triton group kernels (any GroupView); the twin of MaskedNormFunction.
    Returns the output and the batch's per-group (mean, unbiased variance, count), the latter not
    differentiable. Double backward, and backward under torch.func, use the general closed form
    (torch ops); the jvp is the general closed form evaluated with the kernels' statistics."""

    @staticmethod
    def forward(ctx, x, mask, weight, bias, view, correction, eps, center, masked):
        out, st, moments = forward(x, mask, weight, bias, view, correction, eps, center, masked)
        ctx.view = view
        ctx.config = (view.dims, correction, eps, center, masked)
        ctx.bias_shape = None if bias is None else (bias.shape, bias.dtype)
        ctx.save_for_backward(x, mask, weight, *st)
        ctx.save_for_forward(x, mask, weight, *st)
        ctx.mark_non_differentiable(*moments)
        return (out, *moments)

    @staticmethod
    def backward(ctx, g_out, *_moments_grads):
        x, mask, weight, *saved = ctx.saved_tensors
        _, correction, _, center, masked = ctx.config
        want = ctx.needs_input_grad
        if needs_general_backward(g_out):
            gx, gw, gb = general_vjp(g_out, x, mask, weight, ctx.bias_shape, ctx.config, want)
        else:
            gx, gw, gb = backward(g_out, x, mask, weight, ctx.bias_shape, GroupStats(*saved), ctx.view, correction,
                                  center, masked, want[2], want[3])
        return (gx if want[0] else None), None, gw, gb, None, None, None, None, None

    @staticmethod
    def jvp(ctx, x_dot, _mask_dot, weight_dot, bias_dot, *_config_dots):
        return saved_jvp(ctx, x_dot, weight_dot, bias_dot), None, None, None
