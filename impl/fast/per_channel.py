"""Fast path: batch norm layout (N, C, *S) reduced over every axis but C, mask varying freely.

Per channel, with m the mask as 0/1 and sums over every position of the channel:

    mu = sum m x / k,   var = sum m (x - mu)^2 / nu      (two passes; per channel in float64)
    forward:  out = batch_norm_eval(x; mu, var, gamma, beta, eps)   (then the policy fix-up)
    backward: A = sum_P g_out,  B = sum_P g_out y_hat                 (batch_norm_eval_backward)
              gx = (gamma/s) g_out - m (offset + slope x),  slope = (gamma/s^2) B/nu,
              offset = (gamma/s) A/k - slope mu      (spec/closed_forms.py's vjp_centered, regrouped)

On CPU, for inputs the kernel takes (kernel_takes: up to KERNEL_MAX_NUMEL values, or rows of at least
KERNEL_MIN_ROW values) and a mask constant along C or none, one call of the C++ kernel (kernels/per_channel.cpp:
per_channel_norm and its backward) does all of this in double, reading masked-out positions through a select; the
channels it cannot do exactly are redone as below, and a backward whose sums are not finite runs on the torch
kernels. Otherwise:

A mask constant along C (the usual (N, 1, L) padding mask) turns the masked sum of x into one
matrix product with the mask, which reads x once and writes nothing of its size.
Multiplying by 0 is exact only for finite values: a masked-out NaN, Inf or overflowing square
turns a sum into NaN/Inf, and then that pass is redone with the padding replaced (the same bits
as finite padding). Channels whose statistics overflow, underflow or have no degrees of freedom
are redone with the general statistics. Each of these is a Python-level check (a host sync), so
this path runs in eager mode only, and eps = 0 always takes the general path (its exact
constant-group test needs the general path's shifted statistics).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from masknorm._autograd import (
    compose, forward_ad_active, general_vjp, masked_norm_jvp, masked_norm_vjp, needs_general_backward, redo_groups, regions,
)
from masknorm._stats import GroupStats, group_stats, valid_count, where_or_zero
from masknorm._tracing import lanes_may_run
from masknorm.fast import native


def applies(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    dims: Sequence[int],
    eps: float,
    center: bool,
) -> bool:
    """True for a centered norm with eps > 0 over every axis but axis 1, per-channel affine (the
    caller checks that x is real data in eager mode)."""
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
        and all(t is None or (t.dtype == x.dtype and t.numel() == x.shape[1]
                              and [1] * (nd - t.dim()) + list(t.shape) == per_channel) for t in (weight, bias))
    )


class _ValidSums:
    """Per-channel sums over the valid positions: along each sample in x's dtype, then across the
    batch in float64."""

    def __init__(self, x: torch.Tensor, mask: Optional[torch.Tensor]):
        self.shape = (x.shape[0], x.shape[1], -1)
        self.mf = None if mask is None else mask.to(x.dtype)
        self.column = None
        if mask is not None and mask.shape[1] == 1:
            m = self.mf.expand(x.shape[0], 1, *x.shape[2:]).reshape(x.shape[0], 1, -1)
            self.column = m.transpose(1, 2)  # (N, S, 1) as a view: BLAS reads it contiguously (5x faster)

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """sum_valid t per channel, float64: one matrix product with the mask when it is constant
        along C (t read once, nothing of its size written), else a masked cascaded sum."""
        if self.column is not None:
            per_sample = torch.bmm(t.reshape(self.shape), self.column).squeeze(2)
        else:
            per_sample = (t if self.mf is None else t * self.mf).reshape(self.shape).sum(-1)
        return per_sample.double().sum(0)

    def of_nonnegative_(self, t: torch.Tensor) -> torch.Tensor:
        """sum_valid t per channel, float64, masking t in place: a cascaded sum, because a
        matrix product's running sums lose small terms after a large one (measured: 7 u for one
        outlier among 63 small squares, against 0.6 u)."""
        if self.mf is not None:
            t.mul_(self.mf)
        return t.reshape(self.shape).sum(-1).double().sum(0)


def _statistics(x: torch.Tensor, mask: Optional[torch.Tensor], dims, correction: int, eps: float):
    """(var, stats, padding bound, redo, moments): the bound is >= |x - mu| at every masked-out
    position (a Python float, inf if unknown); redo flags the channels whose statistics leave the
    range where the fused kernels are exact (overflow, underflow, no degrees of freedom), which hold
    placeholder statistics here, or is None when there are none; moments are every channel's
    (mean, unbiased variance, valid count) for running averages. Per-channel values are formed in
    float64, rounded once. One host sync, two when the padding holds non-finite values (and one more
    for each correction of the mean on long rows with a large mean)."""
    keep = [1] * x.dim()
    keep[1] = x.shape[1]
    k = valid_count(mask, x.shape, dims, torch.float64, x.device).expand(keep).reshape(-1)
    nu = k - correction
    bound = 0.0 if mask is None else math.sqrt(torch.finfo(x.dtype).max)  # a finite square is below max
    sums = _ValidSums(x, mask)

    def measure(values: torch.Tensor, mu: Optional[torch.Tensor] = None):
        mu, squares, off = _moments(values, sums, k, keep, mu)
        return (mu, squares, off, *classify(mu, squares, off))

    def classify(mu: torch.Tensor, squares: torch.Tensor, off: torch.Tensor):
        var64, redo = _out_of_range(mu, squares, nu, x.dtype, eps)
        polluted, any_redo, any_off = torch.stack([~torch.isfinite(squares).all(), redo.any(), off.any()]).tolist()
        return var64, redo, polluted, any_redo, any_off

    values = x
    mu, squares, off, var64, redo, polluted, any_redo, any_off = measure(values)
    if mask is not None and polluted:
        # A masked-out NaN, Inf or overflowing square reached a sum (0 * inf): again from the valid
        # values alone, which gives the very bits that finite padding gives.
        values, bound = where_or_zero(mask, x), math.inf
        mu, squares, off, var64, redo, polluted, any_redo, any_off = measure(values)
    for _ in range(3):  # long rows with a large mean: the channels whose first mean was off, again around the corrected one
        if not any_off:
            break
        again, squares_again, off_again = _moments(values, sums, k, keep, mu)
        mu, squares = torch.where(off.reshape(keep), again, mu), torch.where(off, squares_again, squares)
        off = off & off_again
        var64, redo, polluted, any_redo, any_off = classify(mu, squares, off)

    def placeholder(t: torch.Tensor, value: float) -> torch.Tensor:
        return torch.where(redo, value, t).to(x.dtype).reshape(keep)

    inv_s = placeholder((var64 + eps).rsqrt(), 1.0)
    shift = placeholder(mu.reshape(-1), 0.0)
    st = GroupStats(torch.ones_like(shift), shift, inv_s, inv_s, placeholder(k, 1.0), placeholder(nu, 1.0),
                    torch.zeros(keep, dtype=torch.bool, device=x.device))
    moments = tuple(t.to(x.dtype).reshape(keep) for t in (mu, squares / (k - 1), k))
    return placeholder(var64, 1.0), st, bound, (redo.reshape(keep) if any_redo else None), moments


def _out_of_range(mu: torch.Tensor, squares: torch.Tensor, nu: torch.Tensor, dtype: torch.dtype, eps: float):
    """(var in float64, the channels whose statistics the fused kernels cannot use exactly)."""
    var64 = squares / nu
    var = var64.to(dtype)
    info = torch.finfo(dtype)
    in_range = (var < info.max / 16) & ((var > info.tiny * 2.0**64) | (var <= eps * info.eps))
    return var64, ~(torch.isfinite(mu.reshape(-1)) & in_range & (nu > 0))


def _moments(x: torch.Tensor, sums: _ValidSums, k: torch.Tensor, keep, mu1: Optional[torch.Tensor] = None):
    """(mu in x's dtype and keepdim shape, float64 (C,) M2 = sum_valid (x - mu)^2, off), around mu1
    (by default the first pass's mean, sum_V x / k):

        d = x - mu1,  S1 = sum_V d,  S2 = sum_V d^2;    mu = mu1 + S1/k,   M2 = S2 - S1^2/k

    The first pass is a matrix product whose float32 running sums lose digits on long rows with a
    large mean (10^7 values near 1e4: mu1 off by several sigma); the second pass sums the small
    deviations d and corrects both statistics. `off` ((C,) bool) flags the channels whose mu1 was off
    by more than sigma/2^10, where S1^2/k may have cancelled digits of S2: the caller measures them
    again around mu (and only them: a channel's bits depend on its own values alone)."""
    if mu1 is None:
        mu1 = (sums.of(x) / k).to(x.dtype).reshape(keep)
    d = x - mu1
    s1 = sums.of(d)
    shift = s1 / k
    m2 = (sums.of_nonnegative_(d.mul_(d)) - s1 * shift).clamp(min=0)
    off = (shift * shift) * 2.0**20 > m2 / k
    return (mu1.reshape(-1).double() + shift).to(x.dtype).reshape(keep), m2, off


def fused_forward(x, mask, weight, bias, dims, correction: int, eps: float, masked: str):
    """(out, var, stats, padding bound, redo, moments) as _statistics names them, with the output
    of the redone channels and their statistics from the general path."""
    var, st, bound, redo, moments = _statistics(x, mask, dims, correction, eps)
    w = None if weight is None else weight.flatten()
    b = None if bias is None else bias.flatten()
    out = torch.batch_norm(x, w, b, st.shift_scaled.flatten(), var.flatten(), False, 0.0, eps, False)
    if mask is not None and masked != "normalize":
        P, passthrough = regions(mask, st.degenerate, masked)
        out = compose(out, x, P, passthrough, masked)
    if redo is not None:
        out, st = redo_groups(out, st, redo, x, mask, weight, bias, dims, correction, eps, masked)
    return out, var, st, bound, redo, moments


def stats_again(x, mask, dims, correction: int, eps: float, shift, inv_s, redo) -> GroupStats:
    """fused_forward's stats from its (shift, inv_s, redo) without keeping the rest: the placeholder
    form, with the redone channels' general statistics (group_stats is deterministic: the same bits)."""
    keep = shift.shape
    k = valid_count(mask, x.shape, dims, torch.float64, x.device).expand(keep)
    st = GroupStats(torch.ones_like(shift), shift, inv_s, inv_s, k.to(x.dtype), (k - correction).to(x.dtype),
                    torch.zeros(keep, dtype=torch.bool, device=x.device))
    if redo is None:
        return st
    general = group_stats(x, mask, dims, correction, eps, True)
    return GroupStats(*(torch.where(redo, g, f) for g, f in zip(general, st)))


def fused_backward(g_out, x, mask, weight, bias_shape, var, padding_bound: float, st: GroupStats, redo, config,
                   want_w: bool, want_b: bool):
    """(grad x, grad weight, grad bias) from torch's batch-norm backward sums and the closed form,
    the redone channels' terms from their general statistics."""
    dims, masked = config[0], config[4]
    args = (g_out, x, mask, weight, var, padding_bound, st, redo, config)
    grads = _fused_vjp(*args, sanitize=False)
    if grads is None:
        grads = _fused_vjp(*args, sanitize=True)
        if mask is not None and masked == "normalize" and not all(bool(torch.isfinite(t).all()) for t in grads):
            grads = _closed_form_vjp(g_out, x, mask, weight, st, dims, masked)
    return _with_redone(*grads, g_out, x, mask, weight, bias_shape, st, redo, dims, masked, want_w, want_b)


def _with_redone(gx, gw, gb, g_out, x, mask, weight, bias_shape, st: GroupStats, redo, dims, masked: str,
                 want_w: bool, want_b: bool):
    """(grad x, grad weight, grad bias) in the parameters' shapes from the fused ones (gw, gb in keepdim shape),
    the channels flagged in redo replaced by the general closed form on their general statistics st."""
    if redo is not None:
        gx_r, gw_r, gb_r = masked_norm_vjp(where_or_zero(redo, g_out), x, mask, weight, st, dims, True, masked,
                                           want_w, want_b)
        gx = torch.where(redo, gx_r, gx)
        gw = None if gw_r is None else torch.where(redo, gw_r.sum(dims, keepdim=True), gw)
        gb = None if gb_r is None else torch.where(redo, gb_r.sum(dims, keepdim=True), gb)
    gw = gw.reshape(weight.shape) if want_w else None
    gb = gb.reshape(bias_shape[0]) if want_b else None
    return gx, gw, gb


# The x per_channel_norm takes: any of up to KERNEL_MAX_NUMEL values, larger ones where each channel's rows x[n, c]
# hold at least KERNEL_MIN_ROW values (its loops are vectorized along a row; per row they pay a few horizontal
# sums). Measured (one thread, float32, (B, 1, L) mask, 30% padding, fwd+bwd per call, against the torch-op path):
# (64, 256, 1024) 63 ms against 122, (256, 256, 256) 105 against 141, (512, 256, 128) 134-155 against 147-163,
# (1024, 256, 64) 181-186 against 160-166, (4096, 256, 16) 457-498 against 223-238.
KERNEL_MAX_NUMEL = 2**17
KERNEL_MIN_ROW = 128


def kernel_takes(x: torch.Tensor) -> bool:
    """True where per_channel_norm takes x's size (x of rank >= 2)."""
    n = x.numel()
    return 0 < n and (n <= KERNEL_MAX_NUMEL or n // (x.shape[0] * x.shape[1]) >= KERNEL_MIN_ROW)


def kernel_for(x: torch.Tensor, mask: Optional[torch.Tensor]):
    """The fused CPU kernels' ops for this call (per_channel_norm: CPU data of a size kernel_takes, a
    mask of x's rank with size 1 on axis 1 or none), or None (then fused_forward and fused_backward do the work)."""
    if (x.device.type != "cpu" or not kernel_takes(x)
            or (mask is not None and (mask.dim() != x.dim() or mask.shape[1] != 1))):
        return None
    return native.ops()


KERNEL_DTYPES = (torch.float32, torch.float64)


def eager_call(x: torch.Tensor, mask: Optional[torch.Tensor], weight: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], eps: object, masked: object,
               running: Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], object]] = None,
               ) -> Optional[torch.Tensor]:
    """masked_norm_with_moments(x, mask[:, None], every axis but 1, eps=eps, weight, bias, masked)'s output as one
    call of per_channel_norm (whose Autograd kernel records a C++ node where a gradient is wanted), bit for bit,
    and with running = (running_mean, running_var, num_batches_tracked or None, momentum) a batch-norm module's
    running update (_MaskedBatchNorm._track's bits) as one call of per_channel_track: the C++ lane
    (kernels/lanes.cpp's batch_channels), one hop from Python. None where the call is not one the kernel takes (the
    caller's route checks it, raises or runs it) or the kernel flags a channel (the route redoes it; nothing is
    updated): eager mode on real data, no forward-mode AD, x (B, C, *S) of KERNEL_DTYPES on CPU of a size
    kernel_takes, weight and bias (C,) of x's dtype or None, eps a float > 0, mask None or a bool CPU tensor
    (B, *S), running statistics contiguous (C,) tensors of x's dtype, momentum a float or None."""
    if not lanes_may_run():  # first: a tracer must not follow native.lanes() into a first build and its lock
        return None
    lanes = native.lanes()
    if lanes is None:
        return None
    running_mean, running_var, batches, momentum = (None, None, None, None) if running is None else running
    return lanes.batch_channels(x, mask, weight, bias, masked, eps, running_mean, running_var, batches, momentum,
                                KERNEL_MAX_NUMEL, KERNEL_MIN_ROW)


def plain_mask(x: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    """True for no mask or a bool CPU mask of a batch-norm module's plain shape for x: (B, *S) for x (B, C, *S)."""
    return mask is None or (type(mask) is torch.Tensor and mask.dtype == torch.bool and mask.is_cpu
                            and mask.dim() == x.dim() - 1 and mask.shape[0] == x.shape[0]
                            and mask.shape[1:] == x.shape[2:])


def kernel_forward(kernel, x, mask, weight, bias, dims, correction: int, eps: float, masked: str):
    """(out, moments, var, shift, inv_s, redo) from one call of per_channel_norm; the channels it flags (their
    statistics out of its exact range: shift, inv_s, var are placeholders there) redone from the general
    statistics, redo None when there are none (one host sync reads the count)."""
    out, *moments, var, shift, inv_s, redo, flagged = kernel.per_channel_norm(x, mask, weight, bias, correction, eps,
                                                                              masked)
    if flagged.item():
        st = stats_again(x, mask, dims, correction, eps, shift, inv_s, None)
        out, _ = redo_groups(out, st, redo, x, mask, weight, bias, dims, correction, eps, masked)
    else:
        redo = None
    return out, tuple(moments), var, shift, inv_s, redo


def kernel_backward(kernel, g_out, x, mask, weight, bias_shape, var, shift, inv_s, redo, config, want_w: bool,
                    want_b: bool):
    """(grad x, grad weight, grad bias) after kernel_forward, from one call of per_channel_norm_backward, the
    redone channels' terms from their general statistics; when a channel's sums are not finite (a masked-out
    garbage value with a nonzero gradient), the whole call on fused_backward (one host sync reads the count)."""
    dims, correction, eps, _, masked = config
    gx, gw, gb, bad = kernel.per_channel_norm_backward(g_out, x, mask, weight, shift, inv_s, redo, correction, masked)
    if bad.item():
        redo = with_passthrough(redo, x, mask, dims, correction, shift.shape)
        st = stats_again(x, mask, dims, correction, eps, shift, inv_s, redo)
        return fused_backward(g_out, x, mask, weight, bias_shape, var, math.inf, st, redo, config, want_w, want_b)
    if redo is None:
        return gx, (gw.view(weight.shape) if want_w else None), (gb.view(bias_shape[0]) if want_b else None)
    st = stats_again(x, mask, dims, correction, eps, shift, inv_s, redo)
    return _with_redone(gx, gw.view(shift.shape), gb.view(shift.shape), g_out, x, mask, weight, bias_shape, st, redo,
                        dims, masked, want_w, want_b)


def with_passthrough(redo: Optional[torch.Tensor], x, mask, dims, correction: int, shape) -> Optional[torch.Tensor]:
    """redo (None: no channel) with the channels per_channel_norm passes through (k - correction <= 0) added, or
    None when there are none (one host sync): the kernel holds placeholder statistics for them, which torch's
    kernels' backward must not use."""
    degenerate = (valid_count(mask, x.shape, dims, torch.float64, x.device) <= correction).expand(shape)
    redo = degenerate if redo is None else redo | degenerate
    return redo if bool(redo.any()) else None


def _python_backward(dy, x, mask, weight, var, shift, inv_s, correction: int, eps: float, masked: str, bias: bool,
                     general: bool):
    """per_channel_norm's backward where its autograd node cannot use per_channel_norm_backward's result: the
    general closed form in differentiable torch ops (general: double backward, traced inputs, flagged channels), or
    kernel_backward's torch-kernel path for sums that are not finite (its bits). weight of any shape with C values;
    grad weight and grad bias come back as (C,) vectors, empty where there is no such parameter."""
    dims = tuple(d for d in range(x.dim()) if d != 1)
    keep = shift.shape
    mask = mask.unsqueeze(1) if mask is not None and mask.dim() < x.dim() else mask  # the modules' (N, *S)
    w = None if weight is None else weight.reshape(keep)
    bias_shape = (keep, x.dtype) if bias else None
    config = (dims, correction, eps, True, masked)
    if general:
        gx, gw, gb = general_vjp(dy, x, mask, w, bias_shape, config, (True, False, w is not None, bias))
    else:
        redo = with_passthrough(None, x, mask, dims, correction, keep)
        st = stats_again(x, mask, dims, correction, eps, shift, inv_s, redo)
        gx, gw, gb = fused_backward(dy, x, mask, w, bias_shape, var, math.inf, st, redo, config, w is not None, bias)
    return gx, *(x.new_empty(0) if g is None else g.reshape(-1) for g in (gw, gb))


_LIBRARY = torch.library.Library("masknorm", "FRAGMENT")
_LIBRARY.define("per_channel_python_backward(Tensor dy, Tensor x, Tensor? mask, Tensor? weight, Tensor var, "
                "Tensor shift, Tensor inv_s, int correction, float eps, str masked, bool bias, bool general) "
                "-> (Tensor, Tensor, Tensor)")
_LIBRARY.impl("per_channel_python_backward", _python_backward, "CompositeImplicitAutograd")


def forward_only(x, mask, weight, bias, dims, correction: int, eps: float, masked: str):
    """(out, moments) where no autograd is recorded: the bits of PerChannelFunction's forward."""
    kernel = kernel_for(x, mask)
    if kernel is not None:
        out, moments, *_ = kernel_forward(kernel, x, mask, weight, bias, dims, correction, eps, masked)
        return out, moments
    out, *_, moments = fused_forward(x, mask, weight, bias, dims, correction, eps, masked)
    return out, moments


def _closed_form_vjp(g_out, x, mask, weight, st: GroupStats, dims, masked: str):
    """_fused_vjp's (gx, sum_P g_out y_hat, sum_P g_out) from the general closed form (masked_norm_vjp),
    for a masked-out value so far from its channel that y_hat overflows ("normalize"): there the
    regrouped sums are inf or NaN where the exact gradients need not be (one more host sync, only
    after the sanitized pass)."""
    gx, gy, g = masked_norm_vjp(g_out, x, mask, weight, st, dims, True, masked, True, True)
    return gx, gy.sum(dims, keepdim=True), g.sum(dims, keepdim=True)


class PerChannelFunction(torch.autograd.Function):
    """The fused-kernel twin of MaskedNormFunction for the batch-norm layout; returns the output and
    the batch's per-channel (mean, unbiased variance, valid count), the latter not differentiable.

    On CPU (not under forward-mode AD: the kernel has no jvp) one call of per_channel_norm, and one of its
    backward; else torch's fused kernels with the closed form. Channels the fused kernels cannot do exactly are
    redone with the general statistics (a host sync decides whether there are any); every channel's result
    depends on its own values only.
    """

    @staticmethod
    def forward(ctx, x, mask, weight, bias, dims, correction, eps, masked):
        ctx.config = (tuple(dims), correction, eps, True, masked)
        ctx.bias_shape = None if bias is None else (bias.shape, bias.dtype)
        ctx.kernel = None if forward_ad_active() else kernel_for(x, mask)
        if ctx.kernel is not None:
            out, moments, var, shift, inv_s, redo = kernel_forward(ctx.kernel, x, mask, weight, bias, dims, correction,
                                                                   eps, masked)
            ctx.save_for_backward(x, mask, weight, var, shift, inv_s, redo)
        else:
            out, var, st, ctx.padding_bound, redo, moments = fused_forward(x, mask, weight, bias, dims, correction,
                                                                           eps, masked)
            ctx.save_for_backward(x, mask, weight, var, redo, *st)
            ctx.save_for_forward(x, mask, weight, *st)
        ctx.mark_non_differentiable(*moments)
        return (out, *moments)

    @staticmethod
    def backward(ctx, g_out, *_moments_grads):
        want = ctx.needs_input_grad
        if needs_general_backward(g_out):
            x, mask, weight = ctx.saved_tensors[:3]
            gx, gw, gb = general_vjp(g_out, x, mask, weight, ctx.bias_shape, ctx.config, want)
            return gx, None, gw, gb, None, None, None, None
        if ctx.kernel is not None:
            x, mask, weight, var, shift, inv_s, redo = ctx.saved_tensors
            gx, gw, gb = kernel_backward(ctx.kernel, g_out, x, mask, weight, ctx.bias_shape, var, shift, inv_s, redo,
                                         ctx.config, want[2], want[3])
        else:
            x, mask, weight, var, redo, *saved = ctx.saved_tensors
            gx, gw, gb = fused_backward(g_out, x, mask, weight, ctx.bias_shape, var, ctx.padding_bound,
                                        GroupStats(*saved), redo, ctx.config, want[2], want[3])
        return (gx if want[0] else None), None, gw, gb, None, None, None, None

    @staticmethod
    def jvp(ctx, x_dot, _mask_dot, weight_dot, bias_dot, *_config_dots):
        x, mask, weight, *saved = ctx.saved_tensors
        dims, masked = ctx.config[0], ctx.config[4]
        out_dot = masked_norm_jvp(x, x_dot, mask, weight, weight_dot, bias_dot, GroupStats(*saved), dims, True, masked)
        return out_dot, None, None, None


def _fused_vjp(g_out, x, mask, weight, var, padding_bound: float, st, redo, config, sanitize: bool):
    """(gx, sum_P g_out y_hat, sum_P g_out) per channel (keepdim shape), from torch's fused
    batch-norm backward sums; channels flagged in redo hold placeholders, to be replaced.

    Unsanitized, masked-out positions are multiplied by 0, which is exact only for finite values:
    None is returned when a sum is not finite or offset + slope x could overflow there
    (padding_bound bounds |x - mu|). Sanitized, a masked-out position's x is replaced by mu (and its upstream
    gradient by 0 under "keep"/"zero") before the sums, and the mask is applied with where; a
    position that adds 0 either way, so the bits are those finite padding gives.
    """
    eps, masked = config[2], config[4]
    mu, inv_s = st.shift_scaled, st.inv_s
    if redo is not None:  # placeholders: the general statistics of these channels do not fit this form
        mu, inv_s = torch.where(redo, 0.0, mu), torch.where(redo, 1.0, inv_s)
    mf = None if mask is None else mask.to(x.dtype)
    g_p, x_p = g_out, x
    if mask is not None and masked != "normalize":
        g_p = where_or_zero(mask, g_out) if sanitize else g_out * mf
    if mask is not None and sanitize:
        x_p = torch.where(mask | (g_p != 0), x, mu)
    w = None if weight is None else weight.flatten()
    _, sum_gy, sum_g = torch.ops.aten.native_batch_norm_backward(
        g_p, x_p, w, mu.flatten(), var.flatten(), None, None, False, eps, [False, True, True],
    )
    sum_gy, sum_g = sum_gy.reshape(mu.shape), sum_g.reshape(mu.shape)
    gamma_s = inv_s if weight is None else inv_s * weight.reshape(inv_s.shape)
    slope = gamma_s * inv_s * sum_gy / st.nu
    offset = gamma_s * sum_g / st.k - slope * mu
    if not sanitize:
        fits = torch.isfinite(sum_gy) & torch.isfinite(sum_g)
        fits &= (offset + slope * mu).abs() + slope.abs() * padding_bound < torch.finfo(x.dtype).max / 4
        if not bool((fits if redo is None else fits | redo).all()):
            return None
    gx = torch.addcmul(-offset, x_p, -slope)
    if mask is not None:
        gx = where_or_zero(mask, gx) if sanitize else gx.mul_(mf)
    gx.addcmul_(g_p, gamma_s)
    if mask is not None and masked != "normalize":
        P, passthrough = regions(mask, st.degenerate, masked)
        gx = compose(gx, g_out, P, passthrough, masked)
    return gx, sum_gy, sum_g
