"""The properties the oracle checks, each a measurement of one call of the candidate on one example.

    forward:  max |y - y*| / (u kappa) <= FORWARD_BOUND;  gradient: per group max|g - g*| / (u K size) <= GRADIENT_BOUND

Bounds. A correct implementation's error is a few rounding errors of each quantity it forms, each
amplified at most by kappa = (|mu| + sigma)/s (the cancellation in x - mu), so it measures a small
constant in u*kappa; a real bug (padding in the statistics, the wrong divisor, eps outside the
square root, NaN leaking from padding) changes the output by a relative O(1), i.e. by O(1/u) in these
units (~1e16 in float64, ~1e7 in float32). 64 is 16x the worst honest implementation measured and
far below any such bug. In bfloat16 1/u is only 256: there only relative errors above 1/4 fail.
Measured 2026-11-21 (torch 2.13 CPU), worst over 60 hypothesis examples per property, the families
and wrappers of tests/oracle/test_oracle_conformance.py:
    masknorm.masked_norm, 6 families x 3 policies x float64/float32/bfloat16:  forward 3.97, gradient 3.68
      (except the batch-norm fast path's NaN gradient at huge padding, a bug, see that test file)
    torch F.layer_norm / rms_norm / group_norm / batch_norm, float64/float32:    forward 4.0,  gradient 3.99
      (F.layer_norm alone: forward 2.34, gradient 2.9)

Degenerate groups are compared as Semantics.degenerate says (the reference computes the
passthrough; "zero" and "nan" replace it, "unchecked" leaves those positions out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Optional

import numpy as np
import torch

from masknorm._contract import normalize_dims

from ..error import unit_roundoff
from .bias import group_samples
from .compare import ReferenceValues, forward_error, normwise_error, reference_values
from .frameworks import Framework
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
    groups: Optional[np.ndarray] = None  # bias.group_samples of the forward property's call


class WrongOutput(Exception):
    """fn returned something other than an array of x's framework and shape."""


@dataclass(frozen=True)
class Caller:
    """How fn is called: fn(x, mask) (fn(x) without a mask) on arrays of `framework`; the mask is
    inverted when it marks padding (Semantics.padding_mask) and holds only the axes it varies along
    (`mask_dims`) when `squeeze_mask` (Keras and algmarques/masked_norm take a (B, T) mask for a
    (B, T, C) x); with `segments` fn takes the valid positions and their group ids instead."""

    fn: Callable[..., Any]
    framework: Framework
    padding_mask: bool = False
    squeeze_mask: bool = False
    mask_dims: Any = None
    segments: bool = False

    @cached_property
    def target(self) -> Callable[..., Any]:
        """What is called as fn(x, mask): fn, or with `segments` fn(x_nodes, batch) with the
        gather and scatter around it (Framework.segmented)."""
        return self.framework.segmented(self.fn) if self.segments else self.fn

    def mask_arg(self, inp: MaskedInput) -> Optional[torch.Tensor]:
        """The mask as fn receives it (a torch bool tensor; None without a mask)."""
        if inp.mask is None:
            return None
        m = ~inp.mask if self.padding_mask else inp.mask
        if self.squeeze_mask:
            m = m.reshape(tuple(m.shape[d] for d in normalize_dims(self.mask_dims, m.dim())))
        return m

    def call(self, inp: MaskedInput, x: Optional[torch.Tensor] = None) -> Any:
        """fn's output (its framework's array) on inp, or on x with inp's mask."""
        fw, m = self.framework, self.mask_arg(inp)
        return fw.call(self.target, fw.to_native(inp.x if x is None else x), None if m is None else fw.to_native(m))

    def forward(self, inp: MaskedInput, x: Optional[torch.Tensor] = None) -> np.ndarray:
        """fn's output on inp (or on x with inp's mask) as float64 numpy; WrongOutput when it is not
        an array of x's shape."""
        out = self.call(inp, x)
        self.expect_array(out, inp.x)
        return self.framework.to_numpy(out)

    def expect_array(self, out: Any, x: torch.Tensor) -> None:
        """WrongOutput unless out is an array of this framework with x's shape."""
        if not self.framework.is_array(out):
            raise WrongOutput(f"returned {type(out).__name__}, not a {self.framework.array_type}")
        if tuple(out.shape) != tuple(x.shape):
            raise WrongOutput(f"returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}")

    def gradient(self, inp: MaskedInput, grad_out: torch.Tensor, x: Optional[torch.Tensor] = None) -> np.ndarray:
        """grad_out^T d fn/d x at inp.x (or at x with inp's mask) by the framework's autodiff, as
        float64 numpy (0 where fn's output does not depend on x)."""
        fw, m = self.framework, self.mask_arg(inp)
        native_m = None if m is None else fw.to_native(m)
        gx = fw.vjp(self.target, fw.to_native(inp.x if x is None else x), native_m, fw.to_native(grad_out))
        return np.zeros(tuple(inp.x.shape)) if gx is None else fw.to_numpy(gx)


def raised(err: BaseException) -> str:
    """How an exception raised by the candidate is reported."""
    return f"raised {type(err).__name__}: {err}"


def overflowing_to_inf(ref: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The reference values, with those beyond the dtype's range as the infinity they round to
    there: a candidate returning Inf for them has rounded correctly."""
    rounded = torch.from_numpy(ref).to(dtype).double().numpy()
    return np.where(np.isfinite(rounded), ref, rounded)


def expected(inp: MaskedInput, sem: Semantics, grad_out: Optional[torch.Tensor] = None) -> ReferenceValues:
    """The reference's values for inp under sem (with the VJP for grad_out when given)."""
    return reference_values(inp.x, inp.mask, inp.dims, grad_out=grad_out, **sem.reference_options)


def position_kappa(inp: MaskedInput, sem: Semantics, ref: ReferenceValues) -> np.ndarray:
    """kappa of each position's group, plus |yhat*| at masked-out positions under "normalize" (their
    value is outside the statistics, so kappa does not bound (x - mu)/s there), floored at the
    dtype's smallest normal number so that results in the subnormal range are measured absolutely."""
    k = ref.kappa
    if inp.mask is not None and sem.masked == "normalize":
        with np.errstate(invalid="ignore"):
            k = np.where(inp.valid.numpy(), k, k + np.abs(ref.y))
    return np.maximum(k, torch.finfo(inp.x.dtype).tiny)


def _degenerate_forward(want: np.ndarray, where: np.ndarray, sem: Semantics, ref: ReferenceValues):
    """(want, where) with the degenerate groups' expected output as sem.degenerate says."""
    deg = ref.degenerate
    if sem.degenerate == "zero":
        return np.where(deg, 0.0, want), where
    if sem.degenerate == "nan":
        return np.where(deg, math.nan, want), where
    if sem.degenerate == "unchecked":
        return want, where & ~deg
    return want, where


def measure_forward(
    caller: Caller, sem: Semantics, inp: MaskedInput, *, regular_only: bool = False, degenerate_only: bool = False
) -> Outcome:
    """Forward error against the reference at every position; only in non-degenerate groups with
    `regular_only` (the accuracy property); with `degenerate_only` only in the groups with no
    spread (no valid value, one, or all equal): everywhere in the reference's degenerate groups,
    at the valid positions (exactly 0) of the others (with eps > 0; their padded outputs scale
    with 1/sqrt(eps), an accuracy matter); beside a degenerate group of the reference, fn's
    output must only not turn non-finite (a NaN or Inf leaking out), its accuracy being the
    forward property's. With `regular_only` the Outcome also carries each group's systematic-error
    samples (bias.group_samples)."""
    ref = expected(inp, sem)
    try:
        got = caller.forward(inp)
    except WrongOutput as err:
        return Outcome(math.inf, str(err), ref.y)
    except Exception as err:  # noqa: BLE001 - the candidate's failure is the finding
        return Outcome(math.inf, raised(err), ref.y)
    where = np.ones(inp.x.shape, bool)
    if regular_only:
        where &= ~ref.degenerate
    want, where = _degenerate_forward(overflowing_to_inf(ref.y, inp.x.dtype), where, sem, ref)
    if degenerate_only:
        flat = _no_spread(inp)
        if ref.degenerate.any() and (~flat & ~ref.degenerate & ~np.isfinite(got) & np.isfinite(want)).any():
            return Outcome(math.inf, "NaN or Inf output in a group beside a degenerate one, where the reference is finite", want)
        where &= ref.degenerate | (flat & inp.valid.numpy())
    err = forward_error(got, want, position_kappa(inp, sem, ref), dtype=inp.x.dtype, where=where)
    if math.isinf(err):
        return Outcome(err, _finiteness(got, want, where), want)
    groups = None
    if regular_only:
        groups = group_samples(got, ref, inp.x, inp.valid.numpy(), inp.dims, sem.correction, sem.center)
    return Outcome(err, None, want, groups)


def _no_spread(inp: MaskedInput) -> np.ndarray:
    """The positions of groups whose valid values are all equal (or number 0 or 1), in x's shape."""
    valid = inp.valid.numpy()
    x = inp.x.double().numpy()
    with np.errstate(invalid="ignore"):
        top = np.where(valid, x, -np.inf).max(axis=inp.dims, keepdims=True)
        low = np.where(valid, x, np.inf).min(axis=inp.dims, keepdims=True)
    return np.broadcast_to(~(top > low), x.shape)


def measure_padding_forward(caller: Caller, sem: Semantics, inp: MaskedInput, clean: MaskedInput) -> Outcome:
    """fn's output on inp (garbage in its padding) against fn's own output on `clean` (inp with the
    padding clean), where the padding's values must not matter: at the positions the mask keeps,
    and at the padding too under masked="zero"; in u*kappa of the clean input. An accuracy error
    is the same in both, so only a leak of the padding's values fails."""
    try:
        want = caller.forward(clean)
    except Exception:  # noqa: BLE001 - fn's failure on clean input is the other properties' finding
        return Outcome(0.0)
    try:
        got = caller.forward(inp)
    except WrongOutput as err:
        return Outcome(math.inf, str(err), want)
    except Exception as err:  # noqa: BLE001 - the candidate's failure is the finding
        return Outcome(math.inf, raised(err) + " with garbage in the padding", want)
    where = inp.valid.numpy() | (sem.masked == "zero")
    err = forward_error(got, want, position_kappa(clean, sem, expected(clean, sem)), dtype=inp.x.dtype, where=where)
    if math.isinf(err):
        return Outcome(err, _finiteness(got, want, where, "fn's own with the padding clean"), want)
    return Outcome(err, None, want)


def _finiteness(got: np.ndarray, ref: np.ndarray, where: np.ndarray, what: str = "the reference") -> str:
    """Which way the output's finiteness differs from `what`'s (ref) at `where`."""
    if (where & ~np.isfinite(got) & np.isfinite(ref)).any():
        return f"NaN or Inf output where {what} is finite"
    if (where & np.isfinite(got) & ~np.isfinite(ref)).any():
        return f"finite output where {what} is NaN or Inf"
    return f"error on a zero scale (a nonzero output where {what} is exactly 0)"


def measure_gradient(caller: Caller, sem: Semantics, inp: MaskedInput, grad_out: torch.Tensor) -> Outcome:
    """grad_x by the framework's autodiff against the reference VJP, normwise per group: the error
    over u * K * size, K = max(1, the group's position_kappa where it matters) and size the largest
    term of the closed form, max(max|gx*|, max_P |g|/s, sum_P |g yhat*| / (nu s)), at least tiny/u
    (tiny: the dtype's smallest normal). yhat_j's rounding error u*kappa meets sum_P g yhat, which a
    masked-out position far from the mean makes large, so that term is part of the conditioning;
    below tiny/u the terms' own products underflow, so errors there are held to bound * tiny only.
    Degenerate groups: a zero gradient under degenerate="zero", not compared under "nan"/"unchecked"."""
    ref = expected(inp, sem, grad_out)
    try:
        got = caller.gradient(inp, grad_out)
    except Exception as err:  # noqa: BLE001 - the candidate's failure is the finding
        return Outcome(math.inf, raised(err), ref.gx)
    want = overflowing_to_inf(ref.gx, inp.x.dtype)
    if sem.degenerate == "zero":
        want = np.where(ref.degenerate, 0.0, want)
    elif sem.degenerate != "passthrough":
        got = np.where(ref.degenerate, want, got)
    err = normwise_error(got, want, _gradient_size(sem, inp, grad_out, ref), 1.0, inp.dims)
    if math.isinf(err) and not np.isfinite(got).all():
        return Outcome(err, "non-finite gradient where the reference's is finite", want)
    return Outcome(err, None, want)


def measure_padding_gradient(
    caller: Caller, sem: Semantics, inp: MaskedInput, clean: MaskedInput, grad_out: torch.Tensor
) -> Outcome:
    """fn's gradient on inp (garbage in its padding, grad_out 0 there) against fn's own on `clean`
    (inp with the padding clean), at every position, normwise as measure_gradient: an accuracy
    error is the same in both, so only a leak of the padding's values fails."""
    try:
        want = caller.gradient(clean, grad_out)
    except Exception:  # noqa: BLE001 - fn's failure on clean input is the other properties' finding
        return Outcome(0.0)
    try:
        got = caller.gradient(inp, grad_out)
    except Exception as err:  # noqa: BLE001 - the candidate's failure is the finding
        return Outcome(math.inf, raised(err) + " with garbage in the padding", want)
    ref = expected(clean, sem, grad_out)
    err = normwise_error(got, want, _gradient_size(sem, clean, grad_out, ref), 1.0, inp.dims)
    if math.isinf(err) and (~np.isfinite(got) & np.isfinite(want)).any():
        return Outcome(err, "non-finite gradient where fn's own with the padding clean is finite", want)
    return Outcome(err, None, want)


def _gradient_size(sem: Semantics, inp: MaskedInput, grad_out: torch.Tensor, ref: ReferenceValues) -> np.ndarray:
    """u * K * size of measure_gradient, per position (constant over each group)."""
    g = grad_out.double().numpy()
    valid = inp.valid.numpy()
    in_p = np.ones_like(valid) if sem.masked == "normalize" else valid
    live = in_p & (g != 0)
    kap = np.where(valid | live, position_kappa(inp, sem, ref), 0.0)
    group_k = np.maximum(np.max(kap, axis=inp.dims, keepdims=True), 1.0)
    nu = np.maximum(valid.sum(axis=inp.dims, keepdims=True) - sem.correction, 1)
    with np.errstate(invalid="ignore"):
        sum_g_yhat = np.where(live & (ref.inv_s != 0), np.abs(g * ref.y), 0.0).sum(axis=inp.dims, keepdims=True)
    terms = (np.abs(ref.gx), np.where(live, np.abs(g), 0.0) * ref.inv_s, sum_g_yhat / nu * ref.inv_s)
    u = unit_roundoff(inp.x.dtype)
    size = np.maximum(np.maximum.reduce(np.broadcast_arrays(*terms)), torch.finfo(inp.x.dtype).tiny / u)
    return u * group_k * np.max(size, axis=inp.dims, keepdims=True)


def measure_dtype_shape(caller: Caller, inp: MaskedInput) -> Outcome:
    """The output is an array of x's framework, dtype and shape."""
    fw = caller.framework
    try:
        out = caller.call(inp)
        caller.expect_array(out, inp.x)
    except WrongOutput as err:
        return Outcome(0.0, str(err))
    except Exception as err:  # noqa: BLE001 - the candidate's failure is the finding
        return Outcome(0.0, raised(err))
    want = str(inp.x.dtype).removeprefix("torch.")
    if fw.dtype_name(out) != want:
        return Outcome(0.0, f"returned dtype {fw.dtype_name(out)} for x of dtype {want}")
    return Outcome(0.0, None)
