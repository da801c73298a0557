"""The properties the oracle checks, each a measurement of one call of the candidate on one example.

    forward:  max |y - y*| / (u kappa) <= FORWARD_BOUND;  gradient: per group max|g - g*| / (u K size) <= GRADIENT_BOUND

Bounds. A correct implementation's error is a few rounding errors of each quantity it forms, each
amplified at most by kappa = (|mu| + sigma)/s (the cancellation in x - mu), so it measures a small
constant in u*kappa; a real bug (padding in the statistics, the wrong divisor, eps outside the
square root, NaN leaking from padding) changes the output by a relative O(1), i.e. by O(1/u) in these
units (~1e16 in float64, ~1e7 in float32). 64 is 16x the worst honest implementation measured and
far below any such bug. In bfloat16 1/u is only 256: there only relative errors above 1/4 fail.
Measured 2026-11-21 (torch 2.13 CPU), worst over 60 hypothesis examples per property, the families
and wrappers of tests/test_oracle_conformance.py:
    masknorm.masked_norm, 6 families x 3 policies x float64/float32/bfloat16:  forward 3.97, gradient 3.68
      (except the batch-norm fast path's NaN gradient at huge padding, a bug, see that test file)
    torch F.layer_norm / rms_norm / group_norm / batch_norm, float64/float32:    forward 4.0,  gradient 3.99
      (F.layer_norm alone: forward 2.34, gradient 2.9)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..derivatives import vjp
from ..error import kappa, unit_roundoff
from ..forward import masked_norm as reference_norm
from .compare import forward_error, inverse_s, normwise_error
from .semantics import Semantics
from .strategies import MaskedInput

FORWARD_BOUND = 64.0
GRADIENT_BOUND = 64.0


@dataclass(frozen=True)
class Outcome:
    """One measurement: the error in u*kappa (0 where nothing numeric is compared), what went wrong
    regardless of the error (an exception, a dtype; None when nothing), and the reference values."""

    error: float
    problem: Optional[str] = None
    expected: Optional[np.ndarray] = None


def call(fn: Callable[..., Any], inp: MaskedInput, x: Optional[torch.Tensor] = None) -> Any:
    """fn(x, mask), or fn(x) without a mask, on copies (x itself when given)."""
    x = inp.x.clone() if x is None else x
    return fn(x) if inp.mask is None else fn(x, inp.mask.clone())


def raised(err: BaseException) -> str:
    """How an exception raised by the candidate is reported."""
    return f"raised {type(err).__name__}: {err}"


def overflowing_to_inf(ref: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The reference values, with those beyond the dtype's range as the infinity they round to
    there: a candidate returning Inf for them has rounded correctly."""
    rounded = torch.from_numpy(ref).to(dtype).double().numpy()
    return np.where(np.isfinite(rounded), ref, rounded)


def _wrong_output(out: Any, x: torch.Tensor) -> Optional[str]:
    if not isinstance(out, torch.Tensor):
        return f"returned {type(out).__name__}, not a torch.Tensor"
    if tuple(out.shape) != tuple(x.shape):
        return f"returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}"
    return None


def position_kappa(inp: MaskedInput, sem: Semantics, y_ref: np.ndarray) -> np.ndarray:
    """kappa of each position's group, plus |yhat*| at masked-out positions under "normalize" (their
    value is outside the statistics, so kappa does not bound (x - mu)/s there), floored at the
    dtype's smallest normal number so that results in the subnormal range are measured absolutely."""
    opts = dict(correction=sem.correction, eps=sem.eps, center=sem.center)
    k = kappa(inp.x, inp.mask, inp.dims, **opts)
    if inp.mask is not None and sem.masked == "normalize":
        k = np.where(inp.valid.numpy(), k, k + np.abs(y_ref))
    return np.maximum(k, torch.finfo(inp.x.dtype).tiny)


def measure_forward(
    fn: Callable[..., Any], sem: Semantics, inp: MaskedInput, *, valid_only: bool = False, regular_only: bool = False
) -> Outcome:
    """Forward error against the reference at every position; only at the valid ones with
    `valid_only` (garbage padding under "normalize": the true output there is garbage too); only in
    non-degenerate groups with `regular_only` (degenerate groups are a property of their own)."""
    ref = reference_norm(inp.x, inp.mask, inp.dims, **sem.options)
    try:
        out = call(fn, inp)
    except Exception as err:  # noqa: BLE001 - the candidate's failure is the finding
        return Outcome(math.inf, raised(err), ref)
    wrong = _wrong_output(out, inp.x)
    if wrong:
        return Outcome(math.inf, wrong, ref)
    where = np.ones(inp.x.shape, bool)
    if valid_only and sem.masked == "normalize":
        where &= inp.valid.numpy()
    if regular_only:
        where &= inverse_s(inp.x, inp.mask, inp.dims, correction=sem.correction, eps=sem.eps, center=sem.center) != 0
    got = out.detach().cpu().double().numpy()
    want = overflowing_to_inf(ref, inp.x.dtype)
    err = forward_error(got, want, position_kappa(inp, sem, ref), dtype=inp.x.dtype, where=where)
    if math.isinf(err):
        return Outcome(err, _finiteness(got, want, where), ref)
    return Outcome(err, None, ref)


def _finiteness(got: np.ndarray, ref: np.ndarray, where: np.ndarray) -> str:
    """Which way the output's finiteness differs from the reference's at `where`."""
    if (where & ~np.isfinite(got) & np.isfinite(ref)).any():
        return "NaN or Inf output where the reference is finite"
    return "finite output where the reference is NaN or Inf"


def measure_gradient(fn: Callable[..., Any], sem: Semantics, inp: MaskedInput, grad_out: torch.Tensor) -> Outcome:
    """grad_x by torch autograd against the reference VJP, normwise per group: the error over
    u * K * size, K = max(1, the group's position_kappa where it matters) and size the largest term
    of the closed form, max(max|gx*|, max_P |g|/s, sum_P |g yhat*| / (nu s)), at least tiny/u
    (tiny: the dtype's smallest normal). yhat_j's rounding error u*kappa meets sum_P g yhat, which a
    masked-out position far from the mean makes large, so that term is part of the conditioning;
    below tiny/u the terms' own products underflow, so errors there are held to bound * tiny only."""
    ref_gx, _, _ = vjp(grad_out, inp.x, inp.mask, inp.dims, **sem.options)
    x = inp.x.clone().requires_grad_()
    try:
        out = call(fn, inp, x)
        (gx,) = torch.autograd.grad(out, x, grad_out, allow_unused=True)
    except Exception as err:  # noqa: BLE001 - the candidate's failure is the finding
        return Outcome(math.inf, raised(err), ref_gx)
    got = np.zeros(ref_gx.shape) if gx is None else gx.detach().cpu().double().numpy()
    want = overflowing_to_inf(ref_gx, inp.x.dtype)
    err = normwise_error(got, want, _gradient_size(sem, inp, grad_out, ref_gx), 1.0, inp.dims)
    if math.isinf(err) and not np.isfinite(got).all():
        return Outcome(err, "non-finite gradient where the reference's is finite", ref_gx)
    return Outcome(err, None, ref_gx)


def _gradient_size(sem: Semantics, inp: MaskedInput, grad_out: torch.Tensor, ref_gx: np.ndarray) -> np.ndarray:
    """u * K * size of measure_gradient, per position (constant over each group)."""
    y_ref = reference_norm(inp.x, inp.mask, inp.dims, **sem.options)
    g = grad_out.double().numpy()
    valid = inp.valid.numpy()
    in_p = np.ones_like(valid) if sem.masked == "normalize" else valid
    live = in_p & (g != 0)
    kap = np.where(valid | live, position_kappa(inp, sem, y_ref), 0.0)
    group_k = np.maximum(np.max(kap, axis=inp.dims, keepdims=True), 1.0)
    inv_s = inverse_s(inp.x, inp.mask, inp.dims, correction=sem.correction, eps=sem.eps, center=sem.center)
    nu = np.maximum(valid.sum(axis=inp.dims, keepdims=True) - sem.correction, 1)
    with np.errstate(invalid="ignore"):
        sum_g_yhat = np.where(live & (inv_s != 0), np.abs(g * y_ref), 0.0).sum(axis=inp.dims, keepdims=True)
    terms = (np.abs(ref_gx), np.where(live, np.abs(g), 0.0) * inv_s, sum_g_yhat / nu * inv_s)
    u = unit_roundoff(inp.x.dtype)
    size = np.maximum(np.maximum.reduce(np.broadcast_arrays(*terms)), torch.finfo(inp.x.dtype).tiny / u)
    return u * group_k * np.max(size, axis=inp.dims, keepdims=True)


def measure_dtype_shape(fn: Callable[..., Any], inp: MaskedInput) -> Outcome:
    """The output is a tensor of x's dtype and shape."""
    try:
        out = call(fn, inp)
    except Exception as err:  # noqa: BLE001 - the candidate's failure is the finding
        return Outcome(0.0, raised(err))
    wrong = _wrong_output(out, inp.x)
    if wrong is None and out.dtype != inp.x.dtype:
        wrong = f"returned dtype {out.dtype} for x of dtype {inp.x.dtype}"
    return Outcome(0.0, wrong)
