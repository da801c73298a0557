"""Triton kernels for the padded-token layout: layer or RMS norm over rows of D values, one validity
flag per row. Imported only by masknorm.fast.backend when a call runs on them (this module imports
triton); on CPU tensors they run under Triton's interpreter (TRITON_INTERPRET=1, set before triton
is imported), which is how they are verified without a GPU.

Each valid row is normalized with the general path's statistics (masknorm._stats.group_stats, here
for a row whose positions are all valid), in float32 for float16/bfloat16 and in x's dtype
otherwise:

    a = 2^e, e = floor(log2 max|x|) + 1 clamped,   xs = x / a,   c0 = xs_0
    mu' = c0 + (1/D) sum (xs - c0),   var' = sum (xs - mu')^2 / (D - c),   y = gamma (xs - mu') / sqrt(var' + eps/a^2) + beta

A row with no spread (the sum of squares is exactly 0, as shifting by c0 makes it for a constant
row) is normalized unscaled, (x - mu) / sqrt(eps), like the general path. Degenerate rows (padded,
D - c <= 0, or eps = 0 and no spread) pass x through, or give 0 for a padded row under "zero".
Padded rows are read only to be copied: their values enter no statistic and, in the backward, no
parameter gradient (selected with where, never multiplied by 0), so garbage padding gives the
bits of clean padding.

Backward (the closed form of masknorm.spec.closed_forms for a fully valid row, g = gamma dy):

    dx = (a/s) [g - (y_hat/(D - c)) sum g y_hat - (1/D) sum g] / a   (RMS: without the last term)
    dgamma = sum_rows dy y_hat,   dbeta = sum_rows dy                 (over the normalized rows)
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from masknorm._autograd import compute_dtype, general_vjp, needs_general_backward, saved_jvp
from masknorm._stats import GroupStats, exponent_bounds


def interpreted() -> bool:
    """True when the kernels were defined under Triton's interpreter (they then run on CPU tensors)."""
    return isinstance(_forward_kernel, triton.runtime.interpreter.InterpretedFunction)


@triton.jit
def _rounded(v, like, BF16_BY_HAND: tl.constexpr):
    """v rounded to the dtype of `like`, to nearest even. BF16_BY_HAND (under the interpreter, whose
    float32 -> bfloat16 cast truncates): by integer arithmetic on the bits, as the hardware cast does
    (NaN -> the canonical NaN)."""
    if BF16_BY_HAND:
        bits = v.to(tl.uint32, bitcast=True)
        bits = tl.where(v != v, 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(like.dtype)


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    """a / b correctly rounded (a GPU's float32 `/` is approximate; float64's is exact)."""
    if ACC == tl.float32:
        return tl.div_rn(a, b)
    return a / b


@triton.jit
def _sqrt(v, ACC: tl.constexpr):
    """sqrt(v) correctly rounded (a GPU's float32 sqrt is approximate; float64's is exact)."""
    if ACC == tl.float32:
        return tl.sqrt_rn(v)
    return tl.sqrt(v)


@triton.jit
def _row_statistics(X, VALID, P, row, D, CENTER: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """(x as stored, x in ACC with a padded row's zeroed, valid, degenerate, scale, shift, inv_s) of one
    row: y_hat = (x * scale - shift) * inv_s.
    P holds (eps, 1/sqrt(eps) or 0, nu = D - c, lo, hi, D) in ACC: the clamp of e is [lo, hi]. Row
    scalars are divided and square-rooted correctly rounded (div_rn, sqrt_rn: on a GPU `/` and
    sqrt of float32 are approximate), as the interpreter, which verifies them, computes them."""
    cols = tl.arange(0, BLOCK)
    inside = cols < D
    x_raw = tl.load(X + tl.cast(row, tl.int64) * D + cols, mask=inside, other=0.0)
    valid = tl.load(VALID + row) != 0
    eps = tl.load(P)
    nu = tl.load(P + 2)
    lo = tl.load(P + 3)
    x = tl.where(valid & inside, x_raw.to(ACC), 0.0)
    amax = tl.max(tl.abs(x), axis=0)
    e = tl.where(amax > 0, tl.floor(tl.log2(tl.where(amax > 0, amax, 1.0))) + 1, lo)
    e = tl.minimum(tl.maximum(e, lo), tl.load(P + 4))
    inv_a = tl.exp2(-e)
    xs = x * inv_a
    if CENTER:
        c0_x = tl.sum(tl.where(cols == 0, x, 0.0), axis=0)
        c0 = c0_x * inv_a
        d = tl.where(inside, xs - c0, 0.0)
        shift = _div(tl.sum(d, axis=0), tl.load(P + 5), ACC)
        d = tl.where(inside, d - shift, 0.0)
        mu_s = c0 + shift
        mu = c0_x + shift * tl.exp2(e)
    else:
        d = xs
        mu_s = tl.zeros_like(amax)
        mu = mu_s
    ss = tl.sum(d * d, axis=0)
    constant = ss == 0
    degenerate = (tl.load(VALID + row) == 0) | (nu <= 0) | ((eps == 0) & constant)
    var_s = tl.where(degenerate | constant, 1.0, _div(ss, tl.where(degenerate, 1.0, nu), ACC))
    inv_s_scaled = _div(tl.full([], 1.0, ACC), _sqrt(var_s + eps * inv_a * inv_a, ACC), ACC)
    inv_s = tl.where(constant, tl.load(P + 1), inv_s_scaled)
    return x_raw, x, valid, degenerate, tl.where(constant, 1.0, inv_a), tl.where(constant, mu, mu_s), inv_s


@triton.jit
def _forward_kernel(X, VALID, W, B, P, Y, SCALE, SHIFT, INV_S, DEGENERATE, D, CENTER: tl.constexpr,
                    ZERO: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < D
    x_raw, x, valid, degenerate, scale, shift, inv_s = _row_statistics(X, VALID, P, row, D, CENTER, ACC, BLOCK)
    y = (x * scale - shift) * inv_s
    if HAS_W:
        y = y * tl.load(W + cols, mask=inside, other=0.0).to(ACC)
    if HAS_B:
        y = y + tl.load(B + cols, mask=inside, other=0.0).to(ACC)
    out = tl.where(degenerate, x_raw, _rounded(y, x_raw, BF16_BY_HAND))
    if ZERO:
        out = tl.where(valid, out, tl.zeros_like(out))
    tl.store(Y + tl.cast(row, tl.int64) * D + cols, out, mask=inside)
    tl.store(SCALE + row, scale)
    tl.store(SHIFT + row, shift)
    tl.store(INV_S + row, inv_s)
    tl.store(DEGENERATE + row, degenerate.to(tl.int8))


@triton.jit
def _backward_kernel(DY, X, VALID, W, P, SCALE, SHIFT, INV_S, DEGENERATE, DX, DW, DB, n_rows, D, programs,
                     CENTER: tl.constexpr, ZERO: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
                     BLOCK: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=inside, other=0.0).to(ACC)
    nu = tl.load(P + 2)
    dw = tl.zeros([BLOCK], dtype=ACC)
    db = tl.zeros([BLOCK], dtype=ACC)
    for row in range(pid, n_rows, programs):
        start = tl.cast(row, tl.int64) * D  # int32 would overflow past 2^31 values
        dy_raw = tl.load(DY + start + cols, mask=inside, other=0.0)
        x_raw = tl.load(X + start + cols, mask=inside, other=0.0)
        normalized = tl.load(DEGENERATE + row) == 0
        dy = tl.where(normalized & inside, dy_raw.to(ACC), 0.0)
        x = tl.where(normalized & inside, x_raw.to(ACC), 0.0)
        scale = tl.load(SCALE + row)
        inv_s = tl.load(INV_S + row)
        y_hat = tl.where(inside, (x * scale - tl.load(SHIFT + row)) * inv_s, 0.0)
        g = dy
        if HAS_W:
            g = dy * w
        core = g - y_hat * _div(tl.sum(g * y_hat, axis=0), nu, ACC)
        if CENTER:
            core = core - _div(tl.sum(g, axis=0), tl.load(P + 5), ACC)
        dx = tl.where(normalized, _rounded(inv_s * core * scale, dy_raw, BF16_BY_HAND), dy_raw)
        if ZERO:
            dx = tl.where(tl.load(VALID + row) != 0, dx, tl.zeros_like(dx))
        tl.store(DX + start + cols, dx, mask=inside)
        dw += dy * y_hat
        db += dy
    tl.store(DW + pid * BLOCK + cols, dw)
    tl.store(DB + pid * BLOCK + cols, db)


def _bf16_by_hand(dtype: torch.dtype) -> bool:
    """Round float32 results to bfloat16 by hand: under the interpreter only (its cast truncates;
    triton 3.9), so that what it verifies is what the hardware's round-to-nearest-even cast gives."""
    return dtype == torch.bfloat16 and interpreted()


def _num_warps(block: int) -> int:
    """Warps per row: more for wider rows (one row is one block)."""
    return 4 if block < 2048 else 8 if block < 8192 else 16


def _programs(x: torch.Tensor, n_rows: int) -> int:
    """Programs of the backward, each summing its rows' parameter gradients: a few per SM on CUDA,
    a handful under the interpreter (each program runs in turn there)."""
    per_device = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    return max(1, min(n_rows, per_device))


def per_feature(t: Optional[torch.Tensor], x: torch.Tensor, ndims: int) -> Optional[torch.Tensor]:
    """weight or bias as a contiguous vector of the D features of a row; None stays None.
    (The caller has checked that t varies along the normalized axes only.)"""
    if t is None:
        return None
    nshape = x.shape[x.dim() - ndims:]
    trailing = t.shape[max(0, t.dim() - ndims):]
    return t.reshape(trailing).expand(nshape).contiguous().reshape(-1)


def _params(ct: torch.dtype, eps: float, nu: int, D: int, device: torch.device) -> torch.Tensor:
    """The kernels' P: (eps, 1/sqrt(eps) or 0, nu, lo, hi, D) in the computation dtype (a float kernel
    argument would be float32): 1/a = 2^-e with e clamped to [lo, hi] keeps 1/a normal and eps/a^2 finite."""
    lo, hi = exponent_bounds(ct, eps)
    return torch.tensor([eps, eps**-0.5 if eps > 0 else 0.0, nu, lo, min(hi, _normal_exponent(ct)), D], dtype=ct,
                        device=device)


def forward(x: torch.Tensor, valid: torch.Tensor, weight, bias, ndims: int, correction: int, eps: float, center: bool,
            masked: str) -> Tuple[torch.Tensor, GroupStats]:
    """(out, stats): the output in x's dtype and each row's GroupStats (keepdim shape, x's computation
    dtype); `valid` is each row's flag in keepdim shape."""
    ct = compute_dtype(x.dtype)
    D = math.prod(x.shape[x.dim() - ndims:])
    n_rows = x.numel() // D
    x2 = x.contiguous()
    flags = valid.reshape(-1).contiguous()
    y = torch.empty_like(x2)
    scale, shift, inv_s = (torch.empty(n_rows, dtype=ct, device=x.device) for _ in range(3))
    degenerate = torch.empty(n_rows, dtype=torch.int8, device=x.device)
    w, b = per_feature(weight, x, ndims), per_feature(bias, x, ndims)
    block = triton.next_power_of_2(D)
    _forward_kernel[(n_rows,)](
        x2, flags, x2 if w is None else w, x2 if b is None else b, _params(ct, eps, D - correction, D, x.device), y,
        scale, shift, inv_s, degenerate, D, CENTER=center,
        ZERO=masked == "zero", HAS_W=w is not None, HAS_B=b is not None, ACC=_ACC[ct], BLOCK=block,
        BF16_BY_HAND=_bf16_by_hand(x.dtype), num_warps=_num_warps(block),
    )
    keep = valid.shape
    k = torch.zeros(keep, dtype=ct, device=x.device).masked_fill_(valid, float(D))
    st = GroupStats(scale.view(keep), shift.view(keep), inv_s.view(keep), (inv_s * scale).view(keep), k,
                    k - correction, degenerate.view(keep).bool())
    return y.view(x.shape), st


def _normal_exponent(ct: torch.dtype) -> int:
    """The largest e for which 1/a = 2^-e is a normal number (GPUs may flush subnormals to zero):
    for max|x| near the dtype's largest value, x/a then lies in [1/2, 4), as safe for the squares."""
    return round(-math.log2(torch.finfo(ct).smallest_normal))


_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


def backward(g_out: torch.Tensor, x: torch.Tensor, valid: torch.Tensor, weight, bias_shape, st: GroupStats,
             ndims: int, correction: int, center: bool, masked: str, want_w: bool, want_b: bool):
    """(grad x, grad weight, grad bias) in x's dtype and the parameters' dtypes and shapes (bias_shape:
    (shape, dtype) or None); None for a parameter gradient not wanted."""
    ct = compute_dtype(x.dtype)
    D = math.prod(x.shape[x.dim() - ndims:])
    n_rows = x.numel() // D
    w = per_feature(weight, x, ndims)
    block = triton.next_power_of_2(D)
    programs = _programs(x, n_rows)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    params = _params(ct, 0.0, max(D - correction, 1), D, x.device)  # read: nu, of normalized rows only (nu > 0)
    dw, db = (torch.empty(programs, block, dtype=ct, device=x.device) for _ in range(2))
    _backward_kernel[(programs,)](
        g_out.contiguous(), x.contiguous(), valid.reshape(-1).contiguous(), x if w is None else w, params,
        st.scale.reshape(-1), st.shift_scaled.reshape(-1), st.inv_s_scaled.reshape(-1),
        st.degenerate.reshape(-1).to(torch.int8), dx, dw, db, n_rows, D, programs, CENTER=center,
        ZERO=masked == "zero", HAS_W=w is not None, ACC=_ACC[ct], BLOCK=block, BF16_BY_HAND=_bf16_by_hand(x.dtype),
        num_warps=_num_warps(block),
    )
    nshape = x.shape[x.dim() - ndims:]
    gw = _parameter_grad(dw, (weight.shape, weight.dtype), nshape, D) if want_w and weight is not None else None
    gb = _parameter_grad(db, bias_shape, nshape, D) if want_b and bias_shape is not None else None
    return dx, gw, gb


def _parameter_grad(partial: torch.Tensor, shape_dtype, nshape, D: int) -> torch.Tensor:
    """The programs' partial sums (programs, block) summed, in the parameter's shape and dtype (it
    varies along the normalized axes only, maybe broadcast along some)."""
    shape, dtype = shape_dtype
    trailing = shape[max(0, len(shape) - len(nshape)):]
    return partial.sum(0)[:D].reshape(nshape).sum_to_size(trailing).reshape(shape).to(dtype)


class TritonPaddedRowsFunction(torch.autograd.Function):
    """masked_norm on the Triton kernels (the padded-token layout); the twin of MaskedNormFunction.

    Double backward, and backward under torch.func, use the general closed form (torch ops); the
    jvp is the general closed form evaluated with the kernels' statistics."""

    @staticmethod
    def forward(ctx, x, valid, mask, weight, bias, ndims, correction, eps, center, masked):
        out, st = forward(x, valid, weight, bias, ndims, correction, eps, center, masked)
        ctx.config = (tuple(range(x.dim() - ndims, x.dim())), correction, eps, center, masked)
        ctx.bias_shape = None if bias is None else (bias.shape, bias.dtype)
        ctx.save_for_backward(x, valid, mask, weight, *st)
        ctx.save_for_forward(x, mask, weight, *st)
        return out

    @staticmethod
    def backward(ctx, g_out):
        x, valid, mask, weight, *saved = ctx.saved_tensors
        dims, correction, _, center, masked = ctx.config
        want = ctx.needs_input_grad
        if needs_general_backward(g_out):
            gx, gw, gb = general_vjp(g_out, x, mask, weight, ctx.bias_shape, ctx.config, (want[0], *want[2:5]))
        else:
            gx, gw, gb = backward(g_out, x, valid, weight, ctx.bias_shape, GroupStats(*saved), len(dims), correction,
                                  center, masked, want[3], want[4])
        return (gx if want[0] else None), None, None, gw, gb, None, None, None, None, None

    @staticmethod
    def jvp(ctx, x_dot, _valid_dot, _mask_dot, weight_dot, bias_dot, *_config_dots):
        return saved_jvp(ctx, x_dot, weight_dot, bias_dot)
