"""Per-group statistics of masked normalization, robust to range and exact on degenerate groups.

For each group (keepdim shape), with a = 2^e a power of two near max_V |x| and xs = x / a:

    mu' = c0 + (1/k) sum_V (xs - c0)        c0 = xs at the group's first valid position
    var' = (1/nu) sum_V (xs - mu')^2        inv_s' = 1 / sqrt(var' + eps / a^2)
    y_hat = (x / a - mu') * inv_s'          1/s = inv_s' / a

Scaling by an exact power of two keeps every square in range (1e30 or 1e-30 in float32 is safe);
shifting by a valid value c0 makes a constant group give a sum of squares of exactly zero, so the
degenerate test (nu <= 0, or eps = 0 and all valid values equal; RMS: all zero) is exact.
Every operation is a differentiable torch op, so the same code serves the forward pass (under
no_grad) and the recomputation that double backward needs; a and c0 are constants whose
derivatives cancel exactly, so they are detached.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch


class GroupStats(NamedTuple):
    """Statistics of each group, in keepdim shape; y_hat = (x * scale - shift_scaled) * inv_s_scaled."""

    scale: torch.Tensor  # 1/a, an exact power of two
    shift_scaled: torch.Tensor  # mu/a
    inv_s_scaled: torch.Tensor  # a/s
    inv_s: torch.Tensor  # 1/s (inf only where the true 1/s exceeds the dtype's range)
    k: torch.Tensor  # number of valid positions
    nu: torch.Tensor  # k - correction
    degenerate: torch.Tensor  # bool


def exponent_bounds(dtype: torch.dtype, eps: float) -> Tuple[int, int]:
    """Range of e for a = 2^e: 1/a and eps/a^2 stay finite in `dtype`."""
    info = torch.finfo(dtype)
    emax = int(math.log2(info.max)) + 1  # frexp exponent of the largest finite value
    lo = 2 - emax
    if eps > 0:
        lo = max(lo, math.ceil((math.log2(eps) - (emax - 8)) / 2))
    return lo, emax


def inverse_power_of_two(amax: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """1/a, a = 2^e with e = floor(log2 amax) + 1 clamped to [lo, hi]: max|x|/a lies in [1/2, 1).

    Not frexp: ONNX has no frexp (torch.onnx: "No ONNX function found for prims.frexp"), and
    inductor's vectorized clamp of frexp's int32 exponent does not compile on AVX2 CPUs
    (torch 2.13: "no matching function for call to 'maximum(VectorizedN<int, 2>&, Vectorized<int>&)'").
    log2 may be off by one next to a power of two, which moves max|x|/a to [1/4, 2): as safe.
    exp2 of an integer is exact, so scaling by 1/a stays exact. amax = 0 gives e = lo; NaN, e = 0.
    """
    e = torch.nan_to_num(torch.floor(torch.log2(amax)) + 1, nan=0.0).clamp(lo, hi)
    return torch.exp2(-e)


def valid_count(mask: Optional[torch.Tensor], shape: Sequence[int], dims: Sequence[int], dtype: torch.dtype,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """k per group (keepdim shape, `dtype`): valid positions counted along the reduced axes; on the
    mask's device, or without a mask on `device` (default: the CPU), made there rather than copied
    there on every call (on CUDA a copy from the host is a transfer the host waits for)."""
    if mask is None:
        n = _product([shape[d] for d in dims])
        return torch.full([1] * len(shape), n, dtype=dtype, device=device)  # n may be a symbolic size: no float(n)
    wide = [d for d in dims if mask.shape[d] != 1]
    repeat = _product([shape[d] for d in dims if mask.shape[d] == 1])
    counts = mask.sum(wide, keepdim=True, dtype=torch.int64) if wide else mask.to(torch.int64)
    return (counts * repeat).to(dtype)


def first_valid(v: torch.Tensor, mask: Optional[torch.Tensor], dims: Sequence[int]) -> torch.Tensor:
    """v at each group's first valid position (row-major over the reduced axes), keepdim shape;
    0 for a group with no valid position (such groups are degenerate).

    The first valid position is the least row-major index i over the valid positions, and v there
    is sum_j [j = i] v_j, a sum with one non-zero term, so exact. No index arithmetic (div/mod of
    symbolic sizes, which ONNX export cannot translate) and no copy of v.
    """
    ndim = v.dim()
    if mask is None:
        return v[tuple(slice(0, 1) if d in dims else slice(None) for d in range(ndim))]
    index = torch.zeros((), dtype=torch.int64, device=v.device)
    n = 1
    for d in reversed(range(ndim)):
        if d in dims:
            shape_d = [1] * ndim
            shape_d[d] = v.shape[d]
            index = index + torch.arange(v.shape[d], device=v.device).reshape(shape_d) * n
            n = n * v.shape[d]
    first = torch.where(mask, index, n).amin(list(dims), keepdim=True)
    return where_or_zero(index == first, v).sum(list(dims), keepdim=True)


def group_stats(
    x: torch.Tensor,
    mask: Optional[torch.Tensor],
    dims: Sequence[int],
    correction: int,
    eps: float,
    center: bool,
) -> GroupStats:
    """Masked statistics of x (a floating tensor in its compute dtype) per group."""
    dims = list(dims)
    xz = x if mask is None else where_or_zero(mask, x)
    k = valid_count(mask, x.shape, dims, x.dtype, x.device)
    nu = k - correction
    lo, hi = exponent_bounds(x.dtype, eps)
    inv_a = inverse_power_of_two(torch.amax(xz.detach().abs(), dims, keepdim=True), lo, hi)
    xs = xz * inv_a
    if center:
        c0_x = first_valid(xz.detach(), mask, dims)
        c0 = c0_x * inv_a
        d = xs - c0 if mask is None else where_or_zero(mask, xs - c0)
        shift = d.sum(dims, keepdim=True) / k
        d = d - shift if mask is None else where_or_zero(mask, d - shift)
        mu_s = c0 + shift
        mu = c0_x + shift / inv_a
    else:
        d = xs
        mu_s = mu = torch.zeros_like(inv_a)
    ss = (d * d).sum(dims, keepdim=True)
    constant = ss == 0
    degenerate = nu <= 0
    if eps == 0:
        degenerate = degenerate | constant
    var_s = torch.where(degenerate | constant, 1.0, ss / torch.where(degenerate, 1.0, nu))
    inv_s_s = torch.rsqrt(var_s + eps * inv_a * inv_a)
    inv_s = torch.where(constant & ~degenerate, eps**-0.5 if eps > 0 else 0.0, inv_s_s * inv_a)
    # A constant group (eps > 0) is normalized unscaled, (x - mu) / sqrt(eps): its valid outputs are
    # exactly 0 and a padded position's output overflows only where the true value does.
    return GroupStats(
        torch.where(constant, 1.0, inv_a),
        torch.where(constant, mu, mu_s),
        torch.where(constant, inv_s, inv_s_s),
        inv_s,
        k,
        nu,
        degenerate,
    )


def where_or_zero(cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t where cond, else 0 (NaN-safe; a 0-d tensor operand keeps torch.where on its fast kernel)."""
    return torch.where(cond, t, t.new_zeros(()))


def _product(sizes: Sequence[int]) -> int:
    out = 1
    for s in sizes:
        out *= s
    return out
