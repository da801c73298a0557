"""Fast path: layer or RMS norm over trailing axes with one validity flag per group (padded tokens).

When the mask is constant along the reduced axes, every group is either fully valid (plain layer
norm) or fully masked (degenerate: passed through). On CPU, masknorm's fused kernel (kernels/padded_rows.cpp)
normalizes the valid rows and copies the padded ones, one pass over memory each way: layer and RMS
norm, float64/float32, and float16/bfloat16 computed in float32. Otherwise (CUDA, or the kernel
could not be built) layer norm in float32/float64 runs on torch's fused kernels, every row, and the
padded rows are fixed up by row (slices for runs of padding, else an index); the other cases take
the general path:

    forward:  y, mu, rstd = native_layer_norm(x);        y[padded] = x[padded] (or 0)
    backward: dx, dgamma = native_layer_norm_backward(dy, x; mu, rstd = 0 on padded rows)
              dbeta = sum_valid dy;                        dx[padded] = dy[padded] (or 0)

A padded group's garbage stays in its own row of torch's kernel and is then replaced. Valid
groups whose rstd leaves the range where the fused kernels are accurate (overflow or underflow of
squares, a constant group with eps = 0, kappa beyond 1/(4u)) are redone with the general
statistics; whether there are any is a Python-level check (a host sync), so this path runs in
eager mode only.
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch

from masknorm.fast import native
from masknorm._autograd import (
    _cast, compose, compute_dtype, general_vjp, masked_norm_vjp, needs_general_backward,
    redo_groups, regions, saved_jvp, stats_jvp,
)
from masknorm._tracing import lanes_may_run
from masknorm._stats import GroupStats, group_stats, where_or_zero

# rstd in [2^-40, 2^40] keeps n * var within range for any realistic n in float32 and float64; with
# kappa's bound 1/(4u), as 0-d CPU tensors per dtype (any device takes them; not the default device,
# which may be set before import): a Python number would be wrapped on every call.
_LIMITS = {dt: torch.tensor([2.0**-40, 2.0**40, 0.5 / torch.finfo(dt).eps], dtype=dt, device="cpu").unbind()
           for dt in (torch.float32, torch.float64)}


def applies(
    x: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    dims: Sequence[int],
    correction: int,
    center: bool,
) -> bool:
    """True for a layer or RMS norm over trailing axes with one mask flag per group that the fused
    kernel, or (float32/float64 layer norm) torch's kernels, can run (the caller checks that x is
    real data in eager mode: the path's safety check is a host sync)."""
    nd = x.dim()
    nshape = tuple(x.shape[nd - len(dims):])
    return (
        correction == 0
        and tuple(dims) == tuple(range(nd - len(dims), nd))
        and (mask is None or all(mask.shape[d] == 1 for d in dims))
        and all(t is None or (tuple(t.shape) == nshape and t.dtype == x.dtype) for t in (weight, bias))
        and ((center and x.dtype in (torch.float32, torch.float64)) or (x.device.type == "cpu" and native.available()))
    )


def kernel_for(x: torch.Tensor):
    """The fused CPU kernel's ops for x, or None (not on CPU, empty, or the kernel is not built)."""
    return native.ops() if x.is_cpu and x.numel() > 0 else None


def _rows(t: torch.Tensor, ndims: int) -> torch.Tensor:
    """t as (groups, group size): one row per group."""
    return t.reshape(-1, math.prod(t.shape[t.dim() - ndims:]))


class PaddedRows:
    """Which rows of the (groups, group size) view are padded: as contiguous runs when there are at
    most MAX_RUNS of them (sequences padded at their ends), so that copying them is a handful of
    slice copies rather than a gather and a scatter; else as an index."""

    MAX_RUNS = 64

    def __init__(self, valid: torch.Tensor):
        self.valid = valid
        self.runs: Optional[List[Tuple[int, int]]] = None
        real = torch.ones(1, dtype=torch.bool, device=valid.device)  # a valid row before and after
        edges = (torch.cat([real, valid]) != torch.cat([valid, real])).nonzero().squeeze(1)
        if edges.numel() <= 2 * self.MAX_RUNS:  # start, end, start, end, ... of the padded runs
            bounds = edges.tolist()
            self.runs = list(zip(bounds[0::2], bounds[1::2]))

    @functools.cached_property
    def index(self) -> torch.Tensor:
        return (~self.valid).nonzero().squeeze(1)

    @functools.cached_property
    def rows(self) -> torch.Tensor:
        """The valid rows."""
        return self.valid.nonzero().squeeze(1)

    def any(self) -> bool:
        return bool(self.runs) if self.runs is not None else self.index.numel() > 0

    def copy_(self, dst2: torch.Tensor, src2: torch.Tensor) -> None:
        """dst2[padded rows] = src2[padded rows]."""
        if self.runs is None:
            dst2.index_copy_(0, self.index, src2.index_select(0, self.index))
        else:
            for a, b in self.runs:
                dst2[a:b].copy_(src2[a:b])

    def zero_(self, dst2: torch.Tensor) -> None:
        """dst2[padded rows] = 0."""
        if self.runs is None:
            dst2.index_fill_(0, self.index, 0)
        else:
            for a, b in self.runs:
                dst2[a:b].zero_()


def _forward(xc, mask, weight, bias, ndims, eps, center, masked):
    """(out, stats, padded rows or None, kernel or None); the stats in x's computation dtype.

    With the fused CPU kernel, one call normalizes the valid rows and passes the padded ones through
    (their mean and rstd are 0). Else torch's fused layer norm runs on every row; a padded group's
    own NaNs stay in its row, which is then overwritten with x (or 0 under "zero"), not by a
    full-size where.
    """
    valid = _valid(xc, mask, ndims)
    kernel, padded = kernel_and_padding(xc, mask, ndims)
    if kernel is not None:
        y2, mean, rstd = kernel.rows_norm(_rows(xc, ndims), valid.reshape(-1), _flat(weight), _flat(bias), eps,
                                                 center, masked == "zero")
        y, mean, rstd = y2.view(xc.shape), mean.view(valid.shape), rstd.view(valid.shape)
    else:
        y, mean, rstd = torch.native_layer_norm(xc, tuple(xc.shape[xc.dim() - ndims:]), weight, bias, eps)
        if padded.any():
            _overwrite_padded(_rows(y, ndims), _rows(xc, ndims), padded, masked)
    return y, _stats(xc, mask, ndims, mean, rstd), padded, kernel


def _stats(x, mask, ndims: int, mean, rstd) -> GroupStats:
    """The GroupStats of a fused layer norm's (mean, rstd): a padded group is degenerate."""
    valid = _valid(x, mask, ndims)
    n = float(math.prod(x.shape[x.dim() - ndims:]))
    k = torch.zeros_like(mean).masked_fill_(valid, n)  # not valid * n: n would be wrapped into a tensor
    return GroupStats(torch.ones_like(mean), mean, rstd, rstd, k, k, ~valid)


def _valid(x: torch.Tensor, mask: Optional[torch.Tensor], ndims: int) -> torch.Tensor:
    """Each group's validity flag, keepdim shape."""
    keepdim = (*x.shape[: x.dim() - ndims], *[1] * ndims)
    return torch.ones(keepdim, dtype=torch.bool, device=x.device) if mask is None else mask.expand(keepdim)


def kernel_and_padding(x: torch.Tensor, mask: Optional[torch.Tensor], ndims: int):
    """(the fused CPU kernel, None), or (None, the padded rows) where torch's kernels do the work."""
    kernel = kernel_for(x)
    return kernel, (None if kernel is not None else PaddedRows(_valid(x, mask, ndims).reshape(-1)))


def _flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """weight or bias of the normalized shape as a vector (None stays None)."""
    return None if t is None else t.reshape(-1)


def _kernel_backward(kernel, g_out, x, weight, st, fused, ndims, center, masked, want):
    """(grad x, grad weight, grad bias) from the fused CPU kernel: rows flagged in `fused` are
    differentiated, the others passed through (dy, or 0 under "zero") and left out of the sums;
    None for a gradient not wanted."""
    g2, x2 = _rows(g_out, ndims), _rows(x, ndims)
    gx, gw, gb = kernel.rows_norm_backward(
        g2, x2, fused.reshape(-1), st.shift_scaled.reshape(-1), st.inv_s.reshape(-1), _flat(weight), center,
        masked == "zero"
    )
    nshape = x.shape[x.dim() - ndims:]
    return gx.view(g_out.shape), (gw.view(nshape) if want[2] else None), (gb.view(nshape) if want[3] else None)


def _torch_backward(g_out, x, weight, st, padded, ndims, masked, want):
    """(grad x, grad weight, grad bias) from torch's kernels when every group is valid (fused) or
    padded (passed through).

    torch's fused backward runs on all rows with a padded row's mean and rstd set to 0, so the row
    adds dy * (x - 0) * 0 = 0 to the weight gradient; if that is not finite (a padded dy or x is
    not), it runs again with the padded rows of dy and x zeroed, which leaves every term, and so
    the bits, as finite padding gives them. The bias gradient sums the valid rows only
    (embedding_bag adds them without copying); the padded rows of grad x are then overwritten.
    """
    g2, x2 = _rows(g_out, ndims), _rows(x, ndims)
    mean, rstd = st.shift_scaled.reshape(-1, 1), st.inv_s.reshape(-1, 1)
    w = _flat(weight)
    if not padded.any():
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(  # w stands in for the bias: only its shape is used
            g2, x2, [x2.shape[1]], mean, rstd, w, w, [want[0], want[2], want[3] and w is not None]
        )
        gb = g2.sum(0) if want[3] and gb is None else gb
    else:
        keep = ~st.degenerate.reshape(-1, 1)
        mean, rstd = where_or_zero(keep, mean), where_or_zero(keep, rstd)

        def fused(g_rows, x_rows):
            return torch.ops.aten.native_layer_norm_backward(
                g_rows, x_rows, [x2.shape[1]], mean, rstd, w, None, [want[0], want[2], False]
            )

        gx, gw, _ = fused(g2, x2)
        if gw is not None and not bool(torch.isfinite(gw).all()):
            gx, gw, _ = fused(_zero_padded(g2, padded), _zero_padded(x2, padded))
        gb = _sum_rows(g2, padded.rows) if want[3] else None
        if gx is not None:
            _overwrite_padded(gx, g2, padded, masked)
    return (None if gx is None else gx.reshape(g_out.shape)), gw, gb


def _torch_backward_around(redo, g_out, x, mask, weight, st, dims, masked, want):
    """(grad x, grad weight, grad bias) from torch's kernels for the groups not flagged in `redo`
    (whose rows of grad x are left to the caller), on inputs with everything else zeroed."""
    x_clean = x if mask is None else where_or_zero(mask, x)
    P, passthrough = regions(mask, st.degenerate, masked)
    fused = P & ~redo
    nshape = list(x_clean.shape[x_clean.dim() - len(dims):])
    g_p = where_or_zero(fused, g_out)
    gx, gw, _ = torch.ops.aten.native_layer_norm_backward(
        g_p, x_clean, nshape, where_or_zero(fused, st.shift_scaled), where_or_zero(fused, st.inv_s), weight, None,
        [True, want[2], False],
    )
    lead = list(range(g_p.dim() - len(dims)))
    gb = (g_p.sum(lead) if lead else g_p) if want[3] else None
    return compose(gx, g_out, P, passthrough, masked), gw, gb


def _zero_padded(t2: torch.Tensor, padded: PaddedRows) -> torch.Tensor:
    """A copy of t2 with its padded rows set to 0."""
    out = t2.clone()
    padded.zero_(out)
    return out


def _sum_rows(t2: torch.Tensor, rows: torch.Tensor, block: int = 256) -> torch.Tensor:
    """sum over the listed rows of t2, without copying them: embedding_bag in blocks of rows."""
    offsets = torch.arange(0, rows.numel(), block, device=rows.device)
    return torch.nn.functional.embedding_bag(rows, t2, offsets, mode="sum").sum(0)


def _overwrite_padded(dst2: torch.Tensor, src2: torch.Tensor, padded: PaddedRows, masked: str) -> None:
    """A padded (passed-through) row: its source row (x forward, the upstream gradient backward),
    or 0 under "zero"."""
    if masked == "zero":
        padded.zero_(dst2)
    else:
        padded.copy_(dst2, src2)


def _inaccurate(st: GroupStats) -> torch.Tensor:
    """Valid groups where the fused kernel is not accurate: rstd out of range, or kappa ~ |mu| rstd
    above 1/(4u) (measured: error <= 3 u*kappa up to kappa u = 0.67 in float32; at kappa u ~ 1.4,
    sigma ~ one ulp of mu, the fused variance is lost)."""
    r = st.inv_s
    low, high, kappa_limit = _LIMITS[r.dtype]
    in_range = (r >= low) & (r <= high) & (st.shift_scaled.abs() * r <= kappa_limit)
    return ~(st.degenerate | in_range)


def fused_forward(x, mask, weight, bias, ndims: int, eps: float, center: bool, masked: str):
    """(out, stats, padded rows or None, kernel or None, redo or None): _forward with the groups
    where the fused kernel is inaccurate redone from the general statistics (one host sync), in
    x's computation dtype (float32 for float16/bfloat16)."""
    out, st, padded, kernel = _forward(x, mask, weight, bias, ndims, eps, center, masked)
    redo = _inaccurate(st)
    if bool(redo.any()):
        dims = tuple(range(x.dim() - ndims, x.dim()))
        ct = compute_dtype(x.dtype)
        out, st = redo_groups(out.to(ct), st, redo, x.to(ct), mask, _cast(weight, ct), _cast(bias, ct), dims, 0, eps,
                              masked, center)
        out = out.to(x.dtype)
    else:
        redo = None
    return out, st, padded, kernel, redo


def stats_again(x, mask, ndims: int, eps: float, center: bool, mean, rstd, redo) -> GroupStats:
    """fused_forward's stats from its (mean, rstd, redo) without keeping the rest, as _forward
    forms them, with the redone groups' general statistics (deterministic: the same bits)."""
    st = _stats(x, mask, ndims, mean, rstd)
    if redo is None:
        return st
    general = group_stats(x.to(compute_dtype(x.dtype)), mask, tuple(range(x.dim() - ndims, x.dim())), 0, eps, center)
    return GroupStats(*(torch.where(redo, g, f) for g, f in zip(general, st)))


def fused_backward(g_out, x, mask, weight, bias_shape, st: GroupStats, redo, padded, kernel, dims, center: bool,
                   masked: str, want):
    """(grad x, grad weight, grad bias) on the forward's kernel (or torch's kernels), the redone
    groups' terms from their general statistics; want: needs_input_grad of (x, mask, weight, bias)."""
    if kernel is not None:
        fused = ~st.degenerate if redo is None else ~(st.degenerate | redo)
        gx, gw, gb = _kernel_backward(kernel, g_out, x, weight, st, fused, len(dims), center, masked, want)
    elif redo is None:
        gx, gw, gb = _torch_backward(g_out, x, weight, st, padded, len(dims), masked, want)
    else:
        gx, gw, gb = _torch_backward_around(redo, g_out, x, mask, weight, st, dims, masked, want)
    if redo is not None:
        ct = compute_dtype(x.dtype)
        gx_r, gw_r, gb_r = masked_norm_vjp(where_or_zero(redo, g_out.to(ct)), x.to(ct), mask, _cast(weight, ct), st,
                                           dims, center, masked, want[2], want[3])
        gx = torch.where(redo, gx_r, gx).to(x.dtype)
        gw = None if gw is None else gw + gw_r.sum_to_size(gw.shape).to(gw.dtype)
        gb = None if gb is None else gb + gb_r.sum_to_size(gb.shape).to(gb.dtype)
    gw = None if gw is None else gw.reshape(weight.shape)
    gb = None if gb is None else gb.reshape(bias_shape[0])
    return gx, gw, gb


def one_call(kernel, x, mask, weight, bias, ndims: int, eps: float, center: bool,
             masked: str) -> Optional[torch.Tensor]:
    """The output of one call of the fused kernel (padded_rows_norm, whose Autograd kernel records a
    C++ node where a gradient is wanted); None where the kernel flags a row as inaccurate
    (PaddedRowsFunction redoes it; what the call recorded is dropped). Not under forward-mode
    AD: the operator has no jvp."""
    y, _, _, inaccurate = kernel.padded_rows_norm.default(x, mask, weight, bias, ndims, eps, center, masked == "zero")
    return None if inaccurate.item() else y


def eager_call(x: torch.Tensor, mask: Optional[torch.Tensor], ndims: int, eps: object, center: bool,
               weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], masked: object) -> Optional[torch.Tensor]:
    """masked_norm(x, mask[..., None, ..., None], the last ndims axes, ...) as one kernel call, bit for bit,
    for weight, bias and x's trailing axes that the caller has checked against the normalized shape: the C++
    lane (kernels/lanes.cpp's padded_rows). None where the call is not one the kernel takes (or not a valid
    one: the caller's general route raises) or a row was flagged (the general route redoes it): eager mode on
    non-empty CPU data of a floating dtype, no forward-mode AD, mask None or one bool flag per token
    (x.shape[:-ndims]), weight and bias None or of x's dtype and device, eps a float."""
    if not lanes_may_run():  # first: a tracer must not follow native.lanes() into a first build and its lock
        return None
    lanes = native.lanes()
    if lanes is None:
        return None
    return lanes.padded_rows(x, mask, weight, bias, ndims, eps, center, masked)


def _general_backward(dy, x, mask, weight, ndims: int, eps: float, center: bool, zero: bool, bias: bool):
    """padded_rows_norm's backward as the general closed form in differentiable torch ops, for its
    Autograd kernel when the backward is itself recorded (double backward). With one mask flag per
    row, "keep" and "normalize" agree (a padded row passes through under both). A parameter's
    gradient that does not exist comes back empty."""
    dims = tuple(range(x.dim() - ndims, x.dim()))
    if mask is not None and mask.dim() < x.dim():  # one flag per token (the lanes' form): x's rank, as the route's
        mask = mask.reshape(*mask.shape, *[1] * ndims)
    bias_shape = (x.shape[x.dim() - ndims:], x.dtype) if bias else None
    gx, gw, gb = general_vjp(dy, x, mask, weight, bias_shape, (dims, 0, eps, center, "zero" if zero else "normalize"),
                             (True, False, weight is not None, bias))
    return gx, (x.new_empty(0) if gw is None else gw), (x.new_empty(0) if gb is None else gb)


_LIBRARY = torch.library.Library("masknorm", "FRAGMENT")
_LIBRARY.define("padded_rows_general_backward(Tensor dy, Tensor x, Tensor? mask, Tensor? weight, int ndims, float eps, "
                "bool center, bool zero, bool bias) -> (Tensor, Tensor, Tensor)")
_LIBRARY.impl("padded_rows_general_backward", _general_backward, "CompositeImplicitAutograd")


class PaddedRowsFunction(torch.autograd.Function):
    """The fused-kernel twin of MaskedNormFunction.

    On the CPU kernel, one call (padded_rows_norm) normalizes and checks accuracy; if it flags no
    row, that is the forward (ctx.lean), and the backward is one call too. Otherwise groups where
    the fused kernel is inaccurate are redone with the general statistics (a host sync decides
    whether any are); every group's result depends on its own values only. The statistics, and
    the redone groups' arithmetic, are in x's computation dtype (float32 for float16/bfloat16).
    """

    @staticmethod
    def forward(ctx, x, mask, weight, bias, ndims, eps, center, masked):
        ctx.config = (tuple(range(x.dim() - ndims, x.dim())), 0, eps, center, masked)
        ctx.bias_shape = None if bias is None else (bias.shape, bias.dtype)
        ctx.kernel = kernel_for(x)
        ctx.lean = False
        if ctx.kernel is not None:
            y, mean, rstd, inaccurate = ctx.kernel.padded_rows_norm(x, mask, weight, bias, ndims, eps, center,
                                                                    masked == "zero")
            ctx.lean = not inaccurate.item()
            if ctx.lean:
                ctx.save_for_backward(x, mask, weight, mean, rstd)
                ctx.save_for_forward(x, mask, weight, mean, rstd)
                return y
        out, st, ctx.padded, ctx.kernel, redo = fused_forward(x, mask, weight, bias, ndims, eps, center, masked)
        ctx.save_for_backward(x, mask, weight, redo, *st)
        ctx.save_for_forward(x, mask, weight, *st)
        return out

    @staticmethod
    def backward(ctx, g_out):
        dims, _, _, center, masked = ctx.config
        want = ctx.needs_input_grad
        nones = (None,) * 4
        if needs_general_backward(g_out):
            x, mask, weight = ctx.saved_tensors[:3]
            gx, gw, gb = general_vjp(g_out, x, mask, weight, ctx.bias_shape, ctx.config, want)
            return gx, None, gw, gb, *nones
        if ctx.lean:
            x, mask, weight, mean, rstd = ctx.saved_tensors
            gx, gw, gb = ctx.kernel.padded_rows_norm_backward(g_out, x, mask, mean, rstd, weight, len(dims), center,
                                                              masked == "zero")
            gw, gb = (gw if want[2] else None), (gb if want[3] else None)  # of the normalized shape (applies())
        else:
            x, mask, weight, redo, *saved = ctx.saved_tensors
            gx, gw, gb = fused_backward(g_out, x, mask, weight, ctx.bias_shape, GroupStats(*saved), redo, ctx.padded,
                                        ctx.kernel, dims, center, masked, want)
        return (gx if want[0] else None), None, gw, gb, *nones

    @staticmethod
    def jvp(ctx, x_dot, _mask_dot, weight_dot, bias_dot, *_config_dots):
        if ctx.lean:
            x, mask, weight, mean, rstd = ctx.saved_tensors
            st = _stats(x, mask, len(ctx.config[0]), mean, rstd)
            return stats_jvp(x, mask, weight, st, ctx.config, x_dot, weight_dot, bias_dot)
        return saved_jvp(ctx, x_dot, weight_dot, bias_dot)
