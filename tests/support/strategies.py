"""Hypothesis strategies and helpers shared by the torch implementation's property suite
(tests/test_impl_*.py).

A `Case` is one call of masknorm.masked_norm. cases(): x of shape (B, T, L) reduced over one of
DIM_SETS, a mask of any shape that broadcasts to x (full, (B,1,L), (B,T,1), lower rank, ...)
or None, weight/bias of any broadcasting shape or None, and every policy, eps and correction;
padded_tokens() and channels(): the layer-norm and batch-norm layouts that eager fast paths take
(padded_tokens_on_torch_kernels(): the first with the fused CPU kernel off).
Values are offset + scale * z with z in [-1, 1]; the offset sets kappa = (|mu| + sigma)/s up to
about 1e6 (more where the drawn z are close together), and some groups are made constant, so
all-masked, single-valid and constant groups all occur. Strategies draw the values in float64 and
round them once to the case's dtype, so the reference sees exactly what the implementation sees.
Case also carries the contract's bookkeeping (degenerate groups, pass-through positions) and
Scales the error scales of derivatives.

Heavy sweeps carry `@thorough`: they are marked `thorough` and deselected unless `-m` names thorough
(`HYPOTHESIS_PROFILE=thorough python -m pytest -m thorough` runs only them, with many examples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional, Tuple, Union

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

import masknorm
import masknorm.reference as ref
from masknorm.fast import native

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
POLICIES = ("normalize", "keep", "zero")
EPS_VALUES = (0.0, 1e-5, 0.5)
DIM_SETS = (-1, (0, 2), (1,), (0, 1, 2))

# Largest power of ten for |offset| / scale (kappa ~ 10^k) and the range of the scale's exponent,
# chosen per dtype so that offset + scale stays finite and representable with some precision.
_OFFSET_EXP = {torch.float64: 6, torch.float32: 6, torch.bfloat16: 3, torch.float16: 3}
_SCALE_EXP = {torch.float64: (-8, 8), torch.float32: (-8, 8), torch.bfloat16: (-8, 8), torch.float16: (-2, 1)}


def thorough(test):
    """Mark a heavy sweep: deselected unless `-m` names thorough (tests/conftest.py)."""
    return pytest.mark.thorough(test)


@dataclass(frozen=True)
class Case:
    """One masked_norm call; `x`, `weight`, `bias` share one dtype."""

    x: torch.Tensor
    mask: Optional[torch.Tensor]
    dim: Union[int, Tuple[int, ...]]
    correction: int = 0
    eps: float = 1e-5
    center: bool = True
    masked: str = "normalize"
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    fused_kernel: bool = True  # False: the padded-token path runs on torch's kernels
    call: Optional[Callable] = None  # the masked_norm to run (None: masknorm.masked_norm), e.g. a compiled one

    @property
    def options(self) -> dict:
        """The keyword arguments other than weight and bias."""
        return dict(correction=self.correction, eps=self.eps, center=self.center, masked=self.masked)

    @property
    def kwargs(self) -> dict:
        """Every keyword argument of the call."""
        return dict(self.options, weight=self.weight, bias=self.bias)

    @property
    def dims(self) -> Tuple[int, ...]:
        """The reduced axes, non-negative."""
        return tuple(d % self.x.dim() for d in ((self.dim,) if isinstance(self.dim, int) else self.dim))

    @property
    def full_mask(self) -> torch.Tensor:
        """The mask broadcast to x's shape (all True when None)."""
        if self.mask is None:
            return torch.ones(self.x.shape, dtype=torch.bool)
        return self.mask.expand(self.x.shape)

    def run(self, **changes) -> torch.Tensor:
        """masknorm.masked_norm on this case, with some fields replaced."""
        c = replace(self, **changes)
        with native.kernels(c.fused_kernel):
            return (c.call or masknorm.masked_norm)(c.x, c.mask, c.dim, **c.kwargs)

    def reference(self) -> np.ndarray:
        """The mpmath reference's output (float64)."""
        return ref.masked_norm(self.x, self.mask, self.dim, **self.kwargs)

    def y_hat(self) -> np.ndarray:
        """The reference's (x - mu)/s at every position of a non-degenerate group (no affine,
        "normalize"); x itself in degenerate groups."""
        return ref.masked_norm(self.x, self.mask, self.dim, **dict(self.options, masked="normalize"))

    def kappa(self) -> np.ndarray:
        """kappa of each position's group (masknorm.reference.kappa) in x's shape, plus |y_hat*| at
        masked-out positions under "normalize": their value lies outside the group's statistics, so
        the group's kappa does not bound the rounding of (x - mu)/s there (kappa can even be 0)."""
        kappa = ref.kappa(self.x, self.mask, self.dim, correction=self.correction, eps=self.eps, center=self.center)
        if self.mask is None or self.masked != "normalize":
            return kappa
        return np.where(self.full_mask.numpy(), kappa, kappa + np.abs(self.y_hat()))


def inv_s(case: Case) -> torch.Tensor:
    """1/s of each group (keepdim shape, float64), 0 for groups with no valid position or nu <= 0.

    Only a tolerance scale for derivative errors (never an expected value)."""
    x = case.x.double()
    m = case.full_mask
    k = m.sum(case.dims, keepdim=True)
    nu = k - case.correction
    xz = torch.where(m, x, 0)
    mu = xz.sum(case.dims, keepdim=True) / k.clamp(min=1) if case.center else torch.zeros_like(k, dtype=x.dtype)
    ss = torch.where(m, (x - mu) ** 2, 0).sum(case.dims, keepdim=True)
    var = ss / nu.clamp(min=1)
    inv = 1 / torch.sqrt(var + case.eps)
    return torch.where((nu > 0) & torch.isfinite(inv), inv, 0.0)


def degenerate(case: Case) -> torch.Tensor:
    """The contract's degenerate groups (keepdim shape): nu <= 0, or eps = 0 and the valid values
    all equal (RMS: all zero), compared exactly."""
    m = case.full_mask
    nu = m.sum(case.dims, keepdim=True) - case.correction
    x = case.x.double()
    if case.center:
        hi = torch.where(m, x, -math.inf).amax(case.dims, keepdim=True)
        lo = torch.where(m, x, math.inf).amin(case.dims, keepdim=True)
        constant = hi == lo
    else:
        constant = torch.where(m, x != 0, False).sum(case.dims, keepdim=True) == 0
    return (nu <= 0) | (constant & (case.eps == 0))


def passes_through(case: Case) -> torch.Tensor:
    """Where the contract's output is x itself (x's shape): degenerate groups (except masked-out
    positions under "zero") and masked-out positions under "keep"."""
    m = case.full_mask
    deg = degenerate(case).expand(case.x.shape)
    if case.masked == "zero":
        return deg & m
    if case.masked == "keep":
        return deg | ~m
    return deg


def zeroed(case: Case) -> torch.Tensor:
    """Where the contract's output is 0: masked-out positions under "zero"."""
    return ~case.full_mask if case.masked == "zero" else torch.zeros(case.x.shape, dtype=torch.bool)


def grouped(case: Case, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t (broadcasting to x) as a (groups, n) tensor: row g holds group g's positions (None stays None)."""
    if t is None:
        return None
    kept = [d for d in range(case.x.dim()) if d not in case.dims]
    n = math.prod(case.x.shape[d] for d in case.dims)
    return t.expand(case.x.shape).permute(kept + list(case.dims)).reshape(-1, n)

def draws_statistics(case: Case) -> torch.Tensor:
    """Where a position's value enters its group's statistics or its normalized output (x's shape):
    everywhere under "normalize", the valid positions otherwise."""
    if case.masked == "normalize":
        return torch.ones(case.x.shape, dtype=torch.bool)
    return case.full_mask


class Scales:
    """First-order error scales S of a case's derivatives (float64): the closed forms' terms with
    relative errors of size u K in 1/s and u kappa' in y_hat, where K = max(1, the group's kappa)
    and kappa' = max(1, Case.kappa()) (1/s may carry a relative error of order u kappa and still
    meet the forward bound; a multiple of 1/s rounds with relative error u even when kappa < 1).
    g = |gamma grad_out|; sums run over the group's positions that feed the statistics (VJP) or its
    valid positions (JVP); an error is then measured as |d - d*| / (u S):

        grad_x:      S = (1/s) (K (g_j + sum g / k) + (K |y_hat_j| + kappa'_j) sum g |y_hat| / nu
                                + |y_hat_j| sum g kappa' / nu)
        grad_weight: S = sum |grad_out| (K |y_hat| + kappa'),   grad_bias: S = sum |grad_out|
        JVP:         S = |gamma_p| (1/s) (K (|x_dot_p| + sum |x_dot| / k) + (K |y_hat_p| + kappa'_p) sum |y_hat x_dot| / nu
                                          + |y_hat_p| sum kappa' |x_dot| / nu)
                         + |weight_dot_p| (K |y_hat_p| + kappa'_p) + |bias_dot_p|

    (y_hat = (x - mu)/s carries u kappa' from mu and |y_hat| u K from 1/s: K |y_hat| + kappa' wherever y_hat
    appears, as in grad_x's bracket.)

    With |y_hat| = O(1) this is u kappa (1/s) |gamma grad_out| (or |x_dot|) up to a constant; it
    grows where masked-out positions lie far outside their group ("normalize")."""

    def __init__(self, case: Case):
        self.case = case
        self.y_hat = torch.from_numpy(np.abs(case.y_hat()))
        self.kappa = torch.from_numpy(case.kappa()).clamp(min=1)
        group_kappa = ref.kappa(case.x, case.mask, case.dim, correction=case.correction, eps=case.eps, center=case.center)
        self.group_kappa = torch.from_numpy(group_kappa).clamp(min=1)
        self.inv_s = inv_s(case)
        counts = case.full_mask.sum(case.dims, keepdim=True)
        self.k = counts.clamp(min=1)
        self.nu = (counts - case.correction).clamp(min=1)
        self.gamma = torch.ones(()) if case.weight is None else case.weight.double().abs()

    def sum(self, t: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Sum of t over each group's positions `where` (keepdim shape)."""
        return torch.where(where, t, 0).sum(self.case.dims, keepdim=True)

    def _bracket(self, a: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """The shared part of the grad_x and JVP scales for the per-position magnitudes a."""
        big_k, y_hat, kappa = self.group_kappa, self.y_hat, self.kappa
        return (big_k * (a + self.sum(a, where) / self.k) + (big_k * y_hat + kappa) * self.sum(a * y_hat, where) / self.nu
                + y_hat * self.sum(a * kappa, where) / self.nu)

    def grad_x(self, grad_out: torch.Tensor) -> torch.Tensor:
        """S of grad_x (x's shape)."""
        return self.inv_s * self._bracket(self.gamma * grad_out.double().abs(), draws_statistics(self.case))

    def grad_affine(self, grad_out: torch.Tensor, shape, with_y_hat: bool) -> torch.Tensor:
        """S of grad_weight (with_y_hat) or grad_bias, in the parameter's `shape`."""
        g = grad_out.double().abs() * ((self.group_kappa * self.y_hat + self.kappa) if with_y_hat else 1)
        return torch.where(draws_statistics(self.case), g, 0).sum_to_size(shape)

    def jvp(self, x_dot: torch.Tensor, weight_dot, bias_dot) -> torch.Tensor:
        """S of the output tangent (x's shape); weight_dot/bias_dot None = 0."""
        scale = self.gamma * self.inv_s * self._bracket(x_dot.double().abs(), self.case.full_mask)
        if weight_dot is not None:
            scale = scale + weight_dot.double().abs() * (self.group_kappa * self.y_hat + self.kappa)
        if bias_dot is not None:
            scale = scale + bias_dot.double().abs()
        return scale


@st.composite
def broadcast_shapes(draw, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """A shape that broadcasts to `shape` without changing it: each axis kept or 1, leading axes maybe dropped."""
    kept = tuple(s if draw(st.booleans()) else 1 for s in shape)
    return kept[draw(st.integers(0, len(shape) - 1)) :]


def _floats(low: float, high: float):
    """float32-representable values in [low, high] that are 0 or at least 2^-40 in magnitude: for
    upstream gradients, tangents and affine parameters, whose products would otherwise underflow
    float32 and lose all relative precision (which no u-relative error model covers)."""
    return st.floats(low, high, width=32).filter(lambda v: v == 0 or abs(v) >= 2.0**-40)


def _tensor(draw, shape, elements) -> torch.Tensor:
    n = math.prod(shape)
    return torch.tensor(draw(st.lists(elements, min_size=n, max_size=n)), dtype=torch.float64).reshape(shape)


@st.composite
def masks(draw, shape: Tuple[int, ...]) -> Optional[torch.Tensor]:
    """None, or a bool tensor of a shape broadcasting to `shape` (shrinks towards all-masked)."""
    if draw(st.booleans()):
        return None
    mshape = draw(broadcast_shapes(shape))
    n = math.prod(mshape)
    return torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).reshape(mshape)


@st.composite
def values(draw, shape: Tuple[int, ...], dims: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """offset + scale * z in float64 (z in [-1, 1]), some groups constant, rounded to `dtype`."""
    lo, hi = _SCALE_EXP[dtype]
    scale = 10.0 ** draw(st.integers(lo, hi))
    k = draw(st.one_of(st.none(), st.integers(0, _OFFSET_EXP[dtype])))
    offset = 0.0 if k is None else draw(st.sampled_from([-1.0, 1.0])) * 10.0**k
    z = _tensor(draw, shape, st.floats(-1, 1, width=32))
    if draw(st.booleans()):
        group_shape = tuple(1 if d in dims else s for d, s in enumerate(shape))
        n = math.prod(group_shape)
        constant = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n))).reshape(group_shape)
        z = torch.where(constant, z.amax(dims, keepdim=True), z)
    return ((offset + z) * scale).to(dtype)


@st.composite
def affine(draw, shape: Tuple[int, ...], dtype: torch.dtype, exact: bool = False) -> Optional[torch.Tensor]:
    """None, or a weight/bias with values in [-2, 2] (dtype) of `shape` (exact) or a shape broadcasting to it."""
    if draw(st.booleans()):
        return None
    return _tensor(draw, shape if exact else draw(broadcast_shapes(shape)), _floats(-2, 2)).to(dtype)


@st.composite
def cases(
    draw,
    dtype: torch.dtype = torch.float64,
    policies=POLICIES,
    eps_values=EPS_VALUES,
    centers=(True, False),
    corrections=(0, 1),
    dim_sets=DIM_SETS,
) -> Case:
    """A Case of shape (B, T, L) (sizes 1..4) reduced over one of `dim_sets`, the other options
    drawn from the given choices."""
    shape = tuple(draw(st.integers(1, 4)) for _ in range(3))
    dim = draw(st.sampled_from(dim_sets))
    dims = tuple(d % 3 for d in ((dim,) if isinstance(dim, int) else dim))
    return Case(
        x=draw(values(shape, dims, dtype)),
        mask=draw(masks(shape)),
        dim=dim,
        correction=draw(st.sampled_from(corrections)),
        eps=draw(st.sampled_from(eps_values)),
        center=draw(st.sampled_from(centers)),
        masked=draw(st.sampled_from(policies)),
        weight=draw(affine(shape, dtype)),
        bias=draw(affine(shape, dtype)),
    )


def like(draw, t: torch.Tensor, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """A tensor of t's shape and dtype with values in [low, high] (upstream gradients, tangents)."""
    return _tensor(draw, tuple(t.shape), _floats(low, high)).to(t.dtype)


def impl_vjp(case: Case, grad_out: torch.Tensor):
    """(grad_x, grad_weight, grad_bias) of masknorm.masked_norm by torch.autograd (None where absent)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (case.x, case.weight, case.bias)]
    out = case.run(x=leaves[0], weight=leaves[1], bias=leaves[2])
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out))
    return tuple(next(grads) if t is not None else None for t in leaves)


def impl_jvp(case: Case, x_dot: torch.Tensor, weight_dot=None, bias_dot=None) -> torch.Tensor:
    """The output tangent of masknorm.masked_norm by torch.autograd.forward_ad (weight_dot/bias_dot
    None = 0). Dual tensors, not torch.func: eager fast paths stay enabled."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        duals = {}
        for name, dot in (("x", x_dot), ("weight", weight_dot), ("bias", bias_dot)):
            primal = getattr(case, name)
            if primal is not None:
                duals[name] = fwAD.make_dual(primal, torch.zeros_like(primal) if dot is None else dot)
        return fwAD.unpack_dual(case.run(**duals)).tangent


@st.composite
def padded_tokens(draw, dtype: torch.dtype = torch.float64, fused_kernel: bool = True) -> Case:
    """Layer norm over the trailing axes of (B, T, L) (or (B, T, H, L)) with one mask flag per token,
    mask of shape (B, T, 1[, 1]) or None, weight/bias of the normalized shape: the padded-token layout
    (on CPU, run by the fused kernel unless fused_kernel is False; RMS norm too on the kernel)."""
    shape = tuple(draw(st.integers(1, 4)) for _ in range(draw(st.sampled_from([3, 4]))))
    ndims = draw(st.integers(1, len(shape) - 2))
    dims = tuple(range(len(shape) - ndims, len(shape)))
    token_shape = shape[: len(shape) - ndims] + (1,) * ndims
    n = math.prod(token_shape)
    mask = draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=n, max_size=n)))
    normalized = shape[len(shape) - ndims :]
    return Case(
        x=draw(values(shape, dims, dtype)),
        mask=None if mask is None else torch.tensor(mask).reshape(token_shape),
        dim=dims if ndims > 1 else -1,
        eps=draw(st.sampled_from(EPS_VALUES)),
        masked=draw(st.sampled_from(POLICIES)),
        weight=draw(affine(normalized, dtype, exact=True)),
        bias=draw(affine(normalized, dtype, exact=True)),
        center=draw(st.booleans()) if fused_kernel else True,
        fused_kernel=fused_kernel,
    )


@st.composite
def masked_rows(draw, dtype: torch.dtype = torch.float64) -> Case:
    """Layer or RMS norm over the trailing axes of (B, T, L) (or (B, T, H, L)) with a mask that
    varies inside the normalized rows (elementwise, or broadcast along some axes but not all the
    reduced ones) and weight/bias of the normalized shape: the fused row kernel's layout
    (masknorm.fast.masked_positions.RowLayout); any correction, eps, center and policy."""
    shape = [draw(st.integers(1, 4)) for _ in range(draw(st.sampled_from([3, 4])))]
    ndims = draw(st.integers(1, len(shape) - 2))
    dims = tuple(range(len(shape) - ndims, len(shape)))
    varying = draw(st.sampled_from(dims))  # a reduced axis along which the mask varies
    shape[varying] = draw(st.integers(2, 4))
    mshape = [s if d == varying else draw(st.sampled_from([1, s])) for d, s in enumerate(shape)]
    shape, n = tuple(shape), math.prod(mshape)
    normalized = shape[len(shape) - ndims:]
    return Case(
        x=draw(values(shape, dims, dtype)),
        mask=torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n))).reshape(mshape),
        dim=dims if ndims > 1 else -1,
        weight=draw(affine(normalized, dtype, exact=True)),
        bias=draw(affine(normalized, dtype, exact=True)),
        **draw(any_options()),
    )


@st.composite
def any_options(draw) -> dict:
    """correction, eps, center and masked: any of the suite's values."""
    return dict(correction=draw(st.sampled_from([0, 1])), eps=draw(st.sampled_from(EPS_VALUES)),
                center=draw(st.booleans()), masked=draw(st.sampled_from(POLICIES)))


def padded_tokens_on_torch_kernels(dtype: torch.dtype = torch.float64):
    """padded_tokens() with the fused CPU kernel off: torch's kernels and the row fix-ups do the work."""
    return padded_tokens(dtype, fused_kernel=False)


@st.composite
def channels(draw, dtype: torch.dtype = torch.float64) -> Case:
    """The batch-norm layout: (N, C, L) or (N, C, H, W) reduced over every axis but C, a mask of any
    broadcasting shape (or None), per-channel weight/bias of shape (C, 1[, 1]) or None, eps > 0,
    centered: the layout an eager fast path may take."""
    shape = tuple(draw(st.integers(1, 4)) for _ in range(draw(st.sampled_from([3, 4]))))
    dims = tuple(d for d in range(len(shape)) if d != 1)
    per_channel = (shape[1],) + (1,) * (len(shape) - 2)
    return Case(
        x=draw(values(shape, dims, dtype)),
        mask=draw(masks(shape)),
        dim=dims,
        correction=draw(st.sampled_from([0, 1])),
        eps=draw(st.sampled_from(EPS_VALUES[1:])),
        masked=draw(st.sampled_from(POLICIES)),
        weight=draw(affine(per_channel, dtype, exact=True)),
        bias=draw(affine(per_channel, dtype, exact=True)),
    )

