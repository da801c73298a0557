"""The layouts of the Triton group kernels (masknorm.fast.triton_groups) as strided groups, without
importing triton: which view of x a call takes, or why none does.

Every group is one (b, g) of a B x G grid and holds O x I elements of x (contiguous, row-major):

    x[b, g, o, i]      at  b xb + g xg + o xo + i          (i is x's innermost run)
    mask[b, g, o, i]   at  b mb + g mg + o mo + i mi        (strides of a view of the mask)
    gamma, beta        at  g wg + o wo + i wi               (a vector of the parameter's values)

The row-major order of (o, i) is the row-major order of the reduced axes, so "the group's first
valid position" is the one the general path's statistics shift by. Three views:

    positions  (B, G, Cg, L) of masknorm.fast.masked_positions: trailing axes reduced, one mask flag per
               (sample, position), gamma/beta per channel: group and instance norm (O = Cg, I = L),
               and layer/RMS norm with a mask constant along the row (L = 1: O = 1, I = Cg)
    rows       (R, n): trailing axes reduced, a mask that varies inside the rows, gamma/beta per
               position of a row (O = 1, I = n)
    channels   (N, C, S): every axis but axis 1 reduced (batch norm), any mask, gamma/beta per
               channel (B = 1, G = C, O = N, I = S)

The parameter gradients are summed per group by the kernel (`partial`: over the whole group, per
o, or per i) and over the groups here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

PER_GROUP, PER_O, PER_I = 0, 1, 2  # how the kernel sums a group's parameter-gradient terms


@dataclass(frozen=True)
class GroupView:
    """x's groups as a (B, G) grid of O x I elements; see the module docstring."""

    name: str
    shape: torch.Size
    dims: Tuple[int, ...]
    B: int
    G: int
    O: int
    I: int
    x_strides: Tuple[int, int, int]  # xb, xg, xo
    mask_expand: Tuple[int, ...]  # x's rank: the mask broadcast to this, then viewed as mask_shape
    mask_shape: Tuple[int, ...]  # its strides there give mb, mg, mo, mi
    mask_axes: Tuple[int, int, int, int]  # which axis of mask_shape is b, g, o, i (-1: none)
    param_shape: Tuple[int, ...]  # x's rank: where gamma/beta (and their gradients) vary
    param_strides: Tuple[int, int, int]  # wg, wo, wi into the parameter vector
    partial: int  # PER_GROUP, PER_O or PER_I

    @property
    def groups(self) -> int:
        return self.B * self.G

    def keepdim(self) -> Tuple[int, ...]:
        """The shape of per-group statistics (x's rank, reduced axes 1), in (b, g) row-major order."""
        return tuple(1 if d in self.dims else s for d, s in enumerate(self.shape))

    def mask_view(self, mask: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int, int]]:
        """(the mask as a strided view, (mb, mg, mo, mi))."""
        m = mask.expand(self.mask_expand).reshape(self.mask_shape)
        strides = m.stride()
        return m, tuple(0 if a < 0 else strides[a] for a in self.mask_axes)

    def parameter(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """gamma or beta as the contiguous vector the kernel indexes; None stays None."""
        return None if t is None else t.expand(self.param_shape).contiguous().reshape(-1)

    def parameter_grad(self, partial: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
        """The kernel's per-group sums (groups, O or I or 1) summed over the groups into a parameter
        of `shape` and `dtype`."""
        values = partial.reshape(self.B, -1).sum(0)
        return values.reshape(self.param_shape).sum_to_size(shape).to(dtype)


def varying_axes(nd: int, *shapes: Optional[Sequence[int]]) -> List[int]:
    """The axes of an nd-d x along which the weight or bias of these shapes (None: absent) varies."""
    params = [(1,) * (nd - len(p)) + tuple(p) for p in shapes if p is not None]
    return [d for d in range(nd) if any(p[d] != 1 for p in params)]


def shape_of(t: Optional[torch.Tensor]) -> Optional[torch.Size]:
    """t's shape, None for None."""
    return None if t is None else t.shape


def spans(nd: int, r: int, mask_shape: Optional[Sequence[int]], varying: Sequence[int]) -> Tuple[int, int, int, int]:
    """(first, last, s, q) of an nd-d x reduced over its axes from r on: the first and last axis
    along which weight/bias vary (nd and -1 if none), and the (B, G, Cg, L) split at s and q
    (B = shape[:s], L = shape[q:]): with a mask, B and L as small as the mask allows; without one,
    as large as the weight and bias allow."""
    first, last = (varying[0], varying[-1]) if varying else (nd, -1)
    if mask_shape is None:
        return first, last, min(r, first), max(r, last + 1)
    # lists, not max(..., default=) or next(...): torch.compile traces this (fast.ops)
    s = max([0] + [i + 1 for i in range(r) if mask_shape[i] != 1])
    q = min([nd] + [j for j in range(r, nd) if mask_shape[j] != 1])
    return first, last, s, q


def view_for(x: torch.Tensor, mask: Optional[torch.Tensor], weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], dims: Sequence[int]) -> Union[GroupView, str]:
    """The GroupView the kernels take for this call (the mask of x's rank), or why there is none."""
    nd = x.dim()
    dims = tuple(dims)
    varying = varying_axes(nd, shape_of(weight), shape_of(bias))
    if dims == tuple(range(nd - len(dims), nd)):
        return _trailing(x.shape, mask, dims, varying)
    if nd >= 2 and dims == tuple(d for d in range(nd) if d != 1):
        if any(d != 1 for d in varying):
            return f"weight or bias varies along axes {tuple(varying)}: over every axis but 1 the kernels take them per channel"
        return _channels(x.shape, dims)
    return (f"reduces axes {dims} of a {nd}-d x: the kernels reduce trailing axes, or every axis but axis 1 "
            f"(batch norm)")


def _trailing(shape: torch.Size, mask: Optional[torch.Tensor], dims: Tuple[int, ...], varying) -> Union[GroupView, str]:
    nd = len(shape)
    r = nd - len(dims)
    first, last, s, q = spans(nd, r, shape_of(mask), varying)
    if first >= s and last < q:
        return _positions(shape, dims, s, r, q)
    if first >= r:
        return _rows(shape, dims, r)
    return (f"weight or bias varies along kept axes {tuple(d for d in varying if d < r)} while the mask of shape "
            f"{tuple(mask.shape)} varies along them or inside the normalized axes {dims}")


def _positions(shape: torch.Size, dims, s: int, r: int, q: int) -> GroupView:
    nd = len(shape)
    B, G, Cg, L = (math.prod(shape[:s]), math.prod(shape[s:r]), math.prod(shape[r:q]), math.prod(shape[q:]))
    mask_expand, mask_shape = (*shape[:s], *[1] * (q - s), *shape[q:]), (B, L)
    param_shape = (*[1] * s, *shape[s:q], *[1] * (nd - q))
    if L == 1:  # a flag per row: the row's Cg values are its inner run
        return GroupView("positions", shape, dims, B, G, 1, Cg, (G * Cg, Cg, Cg), mask_expand, mask_shape, (0, -1, -1, -1),
                         param_shape, (Cg, 0, 1), PER_I)
    return GroupView("positions", shape, dims, B, G, Cg, L, (G * Cg * L, Cg * L, L), mask_expand, mask_shape, (0, -1, -1, 1),
                     param_shape, (Cg, 1, 0), PER_O)


def _rows(shape: torch.Size, dims, r: int) -> GroupView:
    nd = len(shape)
    R, n = math.prod(shape[:r]), math.prod(shape[r:])
    return GroupView("rows", shape, dims, R, 1, 1, n, (n, 0, n), tuple(shape), (R, n), (0, -1, -1, 1), (*[1] * r, *shape[r:]),
                     (0, 0, 1), PER_I)


def _channels(shape: torch.Size, dims) -> GroupView:
    nd = len(shape)
    N, C, S = shape[0], shape[1], math.prod(shape[2:])
    return GroupView("channels", shape, dims, 1, C, N, S, (C * S, S, C * S), tuple(shape), (N, C, S), (-1, 1, 0, 2),
                     (1, C, *[1] * (nd - 2)), (1, 0, 0), PER_GROUP)
