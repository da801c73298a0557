"""WeightNorm with an optional mask of the entries that take part (pruned weights), as a torch
parametrization whose backward and jvp are the spec's generated closed forms.

Per output row (the slices along `dim`; the whole tensor when dim is None), m = mask (1 = takes part):

    r = ||m v|| = sqrt(sum_i m_i v_i^2),   u = m v / r,   w = g u

- Zero row (r = 0: every entry that takes part is 0, or none takes part): w = 0 and the gradients
  of v and g are 0 (w has no limit at v = 0; never NaN).
- Pruned entries: w = 0, no gradient, and whatever v holds there (NaN, Inf) is never read.
- r is computed on v scaled by an exact power of two a near the row's largest |v_i|, so no square
  overflows or underflows (rows of 1e30 or 1e-30 in float32 give the w of rows of 1), and g/r is
  taken as (g/a) / (r/a), finite wherever g/r is (rows of subnormal entries included).
- Registering (right_inverse, g = r) raises ValueError on a finite row whose norm overflows the
  weight's dtype: no g of that dtype gives the weight back.
- float16/bfloat16 compute in float32 and return their dtype.

The parameters are torch's: `parametrizations.<name>.original0` is g (shape: v's size along dim, 1
elsewhere; 0-d when dim is None) and `original1` is v, so state_dicts of torch's weight_norm load.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from masknorm._autograd import compute_dtype
from masknorm._stats import exponent_bounds, inverse_power_of_two, where_or_zero
from masknorm.spec import weight_norm_forms as wf


class Direction(NamedTuple):
    """u = m v / r per row and what the closed forms need (g inv_r, zero rows)."""

    u: torch.Tensor
    inv_a: torch.Tensor  # 1/a, an exact power of two (keepdim shape)
    r_scaled: torch.Tensor  # r/a, 1 on zero rows
    zero: torch.Tensor  # bool, keepdim shape: r = 0

    def gain(self, g: torch.Tensor) -> torch.Tensor:
        """g / r = (g / a) / (r / a): finite wherever g / r is. Not g (1/a) / (r/a): 1/r overflows on
        rows of subnormal entries (1/a is clamped to 2^126 in float32, r/a is then ~1e-2), where g / r
        is O(1) for the g = r that registering gives."""
        return g * self.inv_a / self.r_scaled


def _sum(t: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """sum over dims (keepdim); no dims: t itself (torch's sum over () would reduce every axis)."""
    return t.sum(tuple(dims), keepdim=True) if dims else t


def _amax(t: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """amax over dims (keepdim); no dims: t itself, as _sum."""
    return torch.amax(t, tuple(dims), keepdim=True) if dims else t


def direction(v: torch.Tensor, mask: Optional[torch.Tensor], dims: Sequence[int]) -> Direction:
    """u = m v / ||m v|| over dims (keepdim), computed on v / a; differentiable in v (a is detached,
    its derivative cancels exactly)."""
    vm = v if mask is None else where_or_zero(mask, v)
    inv_a = inverse_power_of_two(_amax(vm.detach().abs(), dims), *exponent_bounds(v.dtype, 0.0))
    scaled = vm * inv_a
    squares = _sum(scaled * scaled, dims)
    zero = squares == 0
    r_scaled = torch.sqrt(torch.where(zero, 1.0, squares))
    return Direction(scaled / r_scaled, inv_a, r_scaled, zero)


def _reduced_dims(ndim: int, dim: Optional[int]) -> Tuple[int, ...]:
    return tuple(d for d in range(ndim) if d != dim)


class WeightNormFunction(torch.autograd.Function):
    """w = g u (0 on zero rows); backward and jvp from spec/weight_norm_forms.py. Saves g, v and the
    mask only; backward and jvp recompute u from v with differentiable ops, so double backward is
    exact. setup_context and generate_vmap_rule make it usable under torch.func."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], dim: Optional[int]) -> torch.Tensor:
        d = direction(v.to(compute_dtype(v.dtype)), mask, _reduced_dims(v.dim(), dim))
        return torch.where(d.zero, 0.0, g.to(d.u.dtype) * d.u).to(v.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        g, v, mask, dim = inputs
        ctx.save_for_backward(g, v, mask)
        ctx.save_for_forward(g, v, mask)
        ctx.dim = dim

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor):
        g, v, mask = ctx.saved_tensors
        dims = _reduced_dims(v.dim(), ctx.dim)
        d = direction(v.to(compute_dtype(v.dtype)), mask, dims)
        gw = grad_w.to(d.u.dtype) if mask is None else where_or_zero(mask, grad_w.to(d.u.dtype))
        total = _sum(gw * d.u, dims)
        grad_v = torch.where(d.zero, 0.0, wf.weight_norm_vjp_v(gw, 1, d.u, total, d.gain(g.to(d.u.dtype)), 1))
        grad_g = torch.where(d.zero, 0.0, wf.weight_norm_vjp_g(total)).reshape(g.shape)
        return grad_g.to(g.dtype), grad_v.to(v.dtype), None, None

    @staticmethod
    def jvp(ctx, g_dot: Optional[torch.Tensor], v_dot: Optional[torch.Tensor], *_) -> torch.Tensor:
        g, v, mask = ctx.saved_tensors
        dims = _reduced_dims(v.dim(), ctx.dim)
        d = direction(v.to(compute_dtype(v.dtype)), mask, dims)
        vd = torch.zeros_like(d.u) if v_dot is None else v_dot.to(d.u.dtype)
        vd = vd if mask is None else where_or_zero(mask, vd)
        gd = torch.zeros_like(g, dtype=d.u.dtype) if g_dot is None else g_dot.to(d.u.dtype)
        total = _sum(d.u * vd, dims)
        w_dot = wf.weight_norm_jvp(vd, 1, d.u, total, d.gain(g.to(d.u.dtype)), gd, 1)
        return torch.where(d.zero, 0.0, w_dot).to(v.dtype)


class MaskedWeightNorm(nn.Module):
    """The parametrization: forward(g, v) = w; right_inverse(w) = (||m w|| per row, w)."""

    def __init__(self, dim: Optional[int], mask: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("mask", mask)

    def forward(self, weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
        return WeightNormFunction.apply(weight_g, weight_v, self.mask, self.dim)

    def right_inverse(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """g = ||m w|| per row (scaled, so no square overflows), v = w. A finite row whose norm
        overflows weight's dtype raises ValueError: no g of that dtype gives w back."""
        with torch.no_grad():
            dims = _reduced_dims(weight.dim(), self.dim)
            d = direction(weight.to(compute_dtype(weight.dtype)), self.mask, dims)
            g = torch.where(d.zero, 0.0, d.r_scaled / d.inv_a).to(weight.dtype)
            taking_part = weight if self.mask is None else where_or_zero(self.mask, weight)
            lost = torch.isinf(g) & torch.isfinite(_amax(taking_part.abs(), dims))
            if lost.any():
                rows = lost.flatten().nonzero().flatten().tolist()
                largest = max(r / ia for r, ia in zip(d.r_scaled[lost].tolist(), d.inv_a[lost].tolist()))
                raise ValueError(f"the norm of weight row(s) {rows[:8]} along dim={self.dim} overflows {weight.dtype} "
                                 f"(largest {largest:.3g} > {torch.finfo(weight.dtype).max:.3g}): g = ||w|| cannot be "
                                 f"stored in {weight.dtype}; scale the weight down or convert the module to float64 "
                                 f"before weight_norm")
        return (g.reshape(()) if self.dim is None else g), weight

    def extra_repr(self) -> str:
        return f"dim={self.dim}, mask={'None' if self.mask is None else tuple(self.mask.shape)}"


def weight_norm(module: nn.Module, name: str = "weight", dim: Optional[int] = 0,
                mask: Optional[torch.Tensor] = None) -> nn.Module:
    """Reparametrize module.<name> as w = g m v / ||m v|| per slice along `dim` (None: the whole
    tensor), like torch.nn.utils.parametrizations.weight_norm, with an optional bool `mask` of the
    entries that take part (broadcastable to the weight; False = pruned: w = 0 there). Returns module.

    Unlike torch's, dim=-1 is the last axis (torch reads -1 as None), a row whose norm is 0 gives
    w = 0 and zero gradients instead of NaN, and rows whose squares overflow or underflow are exact.
    A finite row whose norm overflows the weight's dtype raises ValueError (g could not hold it).
    """
    weight = getattr(module, name, None) if isinstance(name, str) else None
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module {type(module).__name__} has no tensor attribute {name!r}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got dtype {weight.dtype}")
    if weight.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a 0-d tensor")
    if dim is not None:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int or None, got {type(dim).__name__} {dim!r}")
        if not -weight.dim() <= dim < weight.dim():
            raise ValueError(f"dim must be in [{-weight.dim()}, {weight.dim()}) for {name} of shape "
                             f"{tuple(weight.shape)}, got {dim}")
        dim %= weight.dim()
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        try:
            mask = mask.expand(weight.shape).to(weight.device).clone()
        except RuntimeError:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to {name}'s shape "
                             f"{tuple(weight.shape)}") from None
    parametrize.register_parametrization(module, name, MaskedWeightNorm(dim, mask), unsafe=True)
    return module
