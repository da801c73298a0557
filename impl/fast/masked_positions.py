"""Fast path: groups x positions with one validity flag per (sample, position), on CPU.

x is viewed as (B, G, Cg, L) and the mask as (B, L): the leading axes along which the mask varies
form B, the other kept axes G, the reduced axes before the first one along which the mask varies
Cg (the channels of a group), the rest L. This covers

    group norm     (B, G, C/G, *S) over (C/G, *S), mask (B, 1, 1, *S)   -> (B, G, C/G, prod S)
    instance norm  (B, C, *S) over S, mask (B, 1, *S)                   -> (B, C, 1, prod S)

with weight and bias per channel (constant along B and L). Token masks ((B, T, D) over D with a
(B, T, 1) mask: L = 1, one position per channel row) are left to the other paths: the kernel
walks each channel's row of L positions, and rows of one position would cost a loop each. One call of the fused kernel
(kernels/masked_positions.cpp) computes each group's statistics in double, normalizes and
applies the policy; its backward is the closed-form VJP of spec/CONTRACT.md with sum_P g and
sum_P g y_hat per group. Groups the kernel cannot do exactly (a zero sum of squares, rstd outside
[2^-40, 2^40], kappa above 1/(4u)) are redone with the general statistics; whether there are any
is a host sync, so this path runs in eager mode only. Double backward and forward AD use the
general formulas (general_vjp, masked_norm_jvp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Dict, List, Optional, Sequence

import torch

from masknorm.fast import group_views, native
from masknorm._autograd import (
    _cast, compute_dtype, general_vjp, masked_norm_jvp, masked_norm_vjp, needs_general_backward, redo_groups,
)
from masknorm._stats import GroupStats, group_stats, where_or_zero

POLICY = {"normalize": 0, "keep": 1, "zero": 2}
DEGENERATE, REDO = 1, 2  # the kernel's group states (0: fused)


@dataclass(frozen=True)
class Layout:
    """x as (B, G, Cg, L): B = prod(shape[:s]), G = prod(shape[s:r]), Cg = prod(shape[r:q]), L = prod(shape[q:]).

    A layout depends on shapes only; layout() keeps one per call signature, so the derived shapes
    below are computed once per signature (cached_property)."""

    s: int
    r: int
    q: int
    shape: torch.Size
    op: ClassVar[str] = "masked_positions_norm"  # the kernel (torch.ops.masknorm) and its "_backward"

    def sizes(self) -> tuple:
        return self._sizes

    @cached_property
    def _sizes(self) -> tuple:
        shape = self.shape
        return (math.prod(shape[: self.s]), math.prod(shape[self.s: self.r]), math.prod(shape[self.r: self.q]),
                math.prod(shape[self.q:]))

    def spec(self) -> List[int]:
        """The layout as the integers an operator takes (fast.ops); of_spec reads them back."""
        return [self.s, self.r, self.q, int(isinstance(self, RowLayout))]

    def dims(self) -> tuple:
        """The reduced axes."""
        return tuple(range(self.r, len(self.shape)))

    def keepdim(self) -> tuple:
        return (*self.shape[: self.r], *[1] * (len(self.shape) - self.r))

    def parameter_shape(self) -> tuple:
        """The shape (of x's rank) in which the kernel's weight, bias and their gradients vary."""
        return self._parameter_shape

    @cached_property
    def _parameter_shape(self) -> tuple:
        nd = len(self.shape)
        return (*[1] * self.s, *self.shape[self.s: self.q], *[1] * (nd - self.q))

    @cached_property
    def _parameter_numel(self) -> int:
        return math.prod(self.parameter_shape())

    def channels(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A weight or bias as the kernel's values per channel (G * Cg of them): t itself where it
        holds them all (the kernel reads it flat), else expanded."""
        if t is None:
            return None
        return t if t.numel() == self._parameter_numel else t.expand(self.parameter_shape()).reshape(-1)

    def kernel_shape(self, m2: torch.Tensor) -> tuple:
        """The shape in which the kernel reads x: (B, G, Cg, L)."""
        return self._sizes

    @cached_property
    def _ops(self) -> tuple:
        """The kernel's operator overloads (forward, backward); layout() found the kernels built."""
        return getattr(torch.ops.masknorm, self.op).default, getattr(torch.ops.masknorm, self.op + "_backward").default

    def kernel(self, x, m2, weight, bias, correction: int, eps: float, center: bool, policy: int):
        """(y, mean, rstd, state) of the fused kernel: x's shape, then one value per group."""
        y, mean, rstd, state = self._ops[0](
            x.reshape(self.kernel_shape(m2)), m2, self.channels(weight), self.channels(bias), correction, eps, center,
            policy)
        return y.view(x.shape), mean, rstd, state

    def kernel_backward(self, g_out, x, m2, mean, rstd, state, weight, correction: int, center: bool, policy: int):
        """(grad x, per-channel grad weight, per-channel grad bias) of the fused kernel."""
        shape = self.kernel_shape(m2)
        gx, gw, gb = self._ops[1](
            g_out.reshape(shape), x.reshape(shape), m2, mean, rstd, state, self.channels(weight), correction, center,
            policy)
        return gx.view(x.shape), gw, gb

    def parameter_grad(self, per_channel: torch.Tensor, redone: Optional[torch.Tensor], shape, dtype) -> torch.Tensor:
        """The kernel's per-channel gradient (plus the redone groups' terms, x's shape) summed to a
        parameter of `shape` and `dtype`."""
        grad = per_channel.reshape(self.parameter_shape())
        if redone is not None:
            grad = grad + redone.sum_to_size(grad.shape)
        return grad.sum_to_size(shape).to(dtype)

    @cached_property
    def _mask_expand(self) -> tuple:
        return (*self.shape[: self.s], *[1] * (self.q - self.s), *self.shape[self.q:])

    def mask2(self, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The mask as (B, L)."""
        B, _, _, L = self._sizes
        if mask is None:
            return torch.ones(B, L, dtype=torch.bool)
        if mask.shape != self._mask_expand:
            mask = mask.expand(self._mask_expand)
        return mask.reshape(B, L)


class RowLayout(Layout):
    """x as (R, n) rows (s = r = q: B = R, G = Cg = 1, L = n) with a mask per element and weight and
    bias per position of a row: layer and RMS norm over trailing axes with a mask that varies inside
    the rows (kernel masked_row_norm: the group kernel's formulas with w, b per position)."""

    op: ClassVar[str] = "masked_row_norm"

    def parameter_shape(self) -> tuple:
        return (*[1] * self.r, *self.shape[self.r:])

    def kernel_shape(self, m2: torch.Tensor) -> tuple:
        return tuple(m2.shape)


def of_spec(spec: Sequence[int], shape: torch.Size) -> Layout:
    """The Layout whose spec() is `spec`, for x of `shape`."""
    s, r, q, rows = spec
    return (RowLayout if rows else Layout)(s, r, q, shape)


def layout(
    x: torch.Tensor,
    mask: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    dims: Sequence[int],
) -> Optional[Layout]:
    """The (B, G, Cg, L) view when the fused kernel applies: a CPU tensor reduced over trailing
    axes, a mask (of x's rank) per (sample, position), weight/bias of x's dtype constant along B
    and L, and the kernel built; else the (R, n) rows when weight/bias are constant along the kept
    axes and the mask (if any) varies inside the rows; else None (the caller checks eager mode on
    real, non-empty data).

    With a mask, B and L are as small as the mask allows (the mask is copied as (B, L)); without
    one, as large as the weight and bias allow (they are copied as (G * Cg) values). The answer
    depends on the shapes only: eager calls reuse it per signature (at most _MAX_LAYOUTS kept),
    traced calls (symbolic sizes) compute it."""
    if x.device.type != "cpu" or any(t.dtype != x.dtype for t in (weight, bias) if t is not None):
        return None
    if not native.available():
        return None
    key = (x.shape, tuple(dims), group_views.shape_of(mask), group_views.shape_of(weight), group_views.shape_of(bias))
    if torch.compiler.is_compiling():
        return _layout_of(*key)
    lay = _LAYOUTS.get(key, _UNSEEN)
    if lay is _UNSEEN:
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        lay = _LAYOUTS[key] = _layout_of(*key)
    return lay


_MAX_LAYOUTS = 256
_UNSEEN = object()
_LAYOUTS: Dict[tuple, Optional[Layout]] = {}


def _layout_of(shape: torch.Size, dims: tuple, mask_shape, weight_shape, bias_shape) -> Optional[Layout]:
    """layout()'s answer from the shapes (None: absent)."""
    nd = len(shape)
    r = nd - len(dims)
    if dims != tuple(range(r, nd)):
        return None
    first, last, s, q = group_views.spans(nd, r, mask_shape, group_views.varying_axes(nd, weight_shape, bias_shape))
    if first >= s and last < q and not math.prod(shape[q:]) == 1 < math.prod(shape[r:q]):
        return Layout(s, r, q, shape)
    if first >= r and mask_shape is not None and q < nd:
        return RowLayout(r, r, r, shape)
    return None


def _group_stats(lay: Layout, m2, mean, rstd, state, correction: int, dtype: torch.dtype) -> GroupStats:
    """The kernel's statistics as the general path's GroupStats (keepdim shape, `dtype`)."""
    B, G, Cg, _ = lay.sizes()
    keep = lay.keepdim()
    k = (m2.sum(1, dtype=dtype) * Cg).unsqueeze(1).expand(B, G).reshape(keep)
    mean, rstd = mean.reshape(keep), rstd.reshape(keep)
    return GroupStats(torch.ones_like(mean), mean, rstd, rstd, k, k - correction, (state == DEGENERATE).reshape(keep))


def fused_forward(x, mask, weight, bias, lay: Layout, correction: int, eps: float, center: bool, masked: str):
    """(out, m2, mean, rstd, state, redone): the kernel's output with the groups it flags redone from
    the general statistics (one host sync); redone is () or (redo, *GroupStats) of those groups."""
    m2 = lay.mask2(mask)
    out, mean, rstd, state = lay.kernel(x, m2, weight, bias, correction, eps, center, POLICY[masked])
    redone = ()
    if int(state.max()) == REDO:  # the one host sync
        ct = compute_dtype(x.dtype)
        st = _group_stats(lay, m2, mean, rstd, state, correction, ct)
        redo = (state == REDO).reshape(lay.keepdim())
        out, st = redo_groups(out.to(ct), st, redo, x.to(ct), mask, _cast(weight, ct), _cast(bias, ct), lay.dims(),
                              correction, eps, masked, center)
        out, redone = out.to(x.dtype), (redo, *st)
    return out, m2, mean, rstd, state, redone


def redone_stats(x, mask, lay: Layout, m2, mean, rstd, state, correction: int, eps: float, center: bool) -> tuple:
    """fused_forward's `redone` again from its outputs, without keeping it: () unless the kernel
    flagged a group (a host sync), else the same (redo, *GroupStats) (group_stats is deterministic)."""
    if int(state.max()) != REDO:
        return ()
    ct = compute_dtype(x.dtype)
    redo = (state == REDO).reshape(lay.keepdim())
    fused = _group_stats(lay, m2, mean, rstd, state, correction, ct)
    general = group_stats(x.to(ct), mask, lay.dims(), correction, eps, center)
    return (redo, *(torch.where(redo, g, f) for g, f in zip(general, fused)))


def fused_backward(g_out, x, mask, weight, bias_shape, lay: Layout, m2, mean, rstd, state, redone, correction: int,
                   center: bool, masked: str, want_w: bool, want_b: bool):
    """(grad x, grad weight, grad bias) from the kernel's closed-form VJP, the redone groups' terms
    from their general statistics; the parameter gradients are None unless wanted."""
    gx, gw, gb = lay.kernel_backward(g_out, x, m2, mean, rstd, state, weight, correction, center, POLICY[masked])
    gw_r, gb_r = None, None
    if redone:  # the redone groups' terms, from the general statistics
        redo, *st = redone
        ct = compute_dtype(x.dtype)
        gx_r, gw_r, gb_r = masked_norm_vjp(where_or_zero(redo, g_out.to(ct)), x.to(ct), mask, _cast(weight, ct),
                                           GroupStats(*st), lay.dims(), center, masked, want_w, want_b)
        gx = torch.where(redo, gx_r, gx).to(x.dtype)
    gw = lay.parameter_grad(gw, gw_r, weight.shape, weight.dtype) if want_w else None
    gb = lay.parameter_grad(gb, gb_r, *bias_shape) if want_b else None
    return gx, gw, gb


class MaskedPositionsFunction(torch.autograd.Function):
    """masked_norm on the fused group kernel; see masknorm.masked_norm for the contract.

    Saved: x, the mask, the weight and the kernel's per-group (mean, rstd, state); the general
    path's GroupStats are formed only where needed (redone groups, forward AD)."""

    @staticmethod
    def forward(ctx, x, mask, weight, bias, lay, dims, correction, eps, center, masked):
        out, m2, mean, rstd, state, redone = fused_forward(x, mask, weight, bias, lay, correction, eps, center, masked)
        ctx.lay = lay
        ctx.config = (dims, correction, eps, center, masked)
        ctx.bias_shape = None if bias is None else (bias.shape, bias.dtype)
        ctx.save_for_backward(x, mask, weight, m2, mean, rstd, state, *redone)
        ctx.save_for_forward(x, mask, weight, m2, mean, rstd, state, *redone)
        return out

    @staticmethod
    def backward(ctx, g_out):
        x, mask, weight, m2, mean, rstd, state, *redone = ctx.saved_tensors
        dims, correction, _, center, masked = ctx.config
        want = ctx.needs_input_grad
        nones = (None,) * 6
        if needs_general_backward(g_out):
            gx, gw, gb = general_vjp(g_out, x, mask, weight, ctx.bias_shape, ctx.config, want)
            return gx, None, gw, gb, *nones
        gx, gw, gb = fused_backward(g_out, x, mask, weight, ctx.bias_shape, ctx.lay, m2, mean, rstd, state, redone,
                                    correction, center, masked, want[2], want[3])
        return (gx if want[0] else None), None, gw, gb, *nones

    @staticmethod
    def jvp(ctx, x_dot, _mask_dot, weight_dot, bias_dot, *_config_dots):
        x, mask, weight, m2, mean, rstd, state, *redone = ctx.saved_tensors
        dims, correction, _, center, masked = ctx.config
        ct = compute_dtype(x.dtype)
        st = GroupStats(*redone[1:]) if redone else _group_stats(ctx.lay, m2, mean, rstd, state, correction, ct)
        y_dot = masked_norm_jvp(x.to(ct), x_dot.to(ct), mask, _cast(weight, ct), _cast(weight_dot, ct),
                                _cast(bias_dot, ct), st, dims, center, masked)
        return y_dot.to(x.dtype)
