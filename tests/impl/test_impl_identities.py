"""Identities that `masknorm prove` proves (proofs/moments.py, proofs/derivatives.py), checked on
masknorm.masked_norm without weight and bias (so out = yhat on the normalized set P):

- output_moments: sum_V yhat = 0 (centered) and sum_V yhat^2 = nu var/(var + eps);
- idempotence: with eps = 0, normalizing the output again (same mask, correction, center and
  policy) returns it;
- gradient_orthogonality: with eps = 0, grad_x = J^T g sums to 0 over P (centered) and is
  orthogonal to yhat over P (P: every position under "normalize", the valid ones V otherwise;
  the VJP is 0 off V when P is V).

Only non-degenerate groups (s > 0) are judged: the theorems are about yhat, which degenerate groups
do not have (their pass-through is degenerate_passthrough's test). Expected values are exact
rationals (fractions.Fraction of the float inputs and results), never the code under test, and
every sum is taken exactly; the bounds follow from the suite's per-position bounds
(support/bounds.py), u the dtype's unit roundoff:
- forward: |y_p - yhat_p| <= E_p = FORWARD_BOUND u kappa_p (kappa_p as Case.kappa);
- grad_x: |gx_j - gx*_j| <= VJP_X_BOUND u S_j (S_j = Scales.grad_x).
"""

import math
from dataclasses import replace
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import masknorm.reference as ref
from support.bounds import FORWARD_BOUND, VJP_X_BOUND
from support.strategies import (
    Case, Scales, cases, degenerate, draws_statistics, grouped, impl_vjp, like, passes_through, zeroed,
)

dtypes = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
U64 = ref.unit_roundoff(torch.float64)


def _plain(case: Case) -> Case:
    """The case without weight and bias: its output is yhat on P. Cases with subnormal inputs are
    left out: those carry an absolute error that no relative bound covers (bounds.forward_error)."""
    x = case.x.abs()
    assume(bool(((x == 0) | (x >= torch.finfo(case.x.dtype).smallest_normal)).all()))
    return replace(case, weight=None, bias=None)


def _live(case: Case) -> list:
    """Indices of the groups (rows of `grouped`) that are not degenerate: they have s > 0."""
    return torch.nonzero(~grouped(case, degenerate(case))[:, 0]).flatten().tolist()


def _exact(t: torch.Tensor) -> list:
    """The values of t as exact rationals."""
    return [Fraction(v) for v in t.double().tolist()]


def _forward_error(case: Case) -> torch.Tensor:
    """E = FORWARD_BOUND u kappa in x's shape (float64): the forward bound with no weight or bias."""
    return FORWARD_BOUND[case.x.dtype] * ref.unit_roundoff(case.x.dtype) * torch.from_numpy(case.kappa())


@pytest.mark.theorem("output_moments")
@dtypes
@given(data=st.data())
def test_output_moments(dtype, data):
    """For every non-degenerate group, with var and eps exact: |sum_V y| <= sum_V E (centered) and
    |sum_V y^2 - nu var/(var + eps)| <= sum_V E (2 |y| + 3 E) (y^2 - yhat^2 = (y - yhat)(y + yhat),
    |yhat| <= |y| + E), any mask, policy, correction and eps."""
    case = _plain(data.draw(cases(dtype)))
    out, x, valid, error = (grouped(case, t) for t in (case.run(), case.x, case.full_mask, _forward_error(case)))
    for g in _live(case):
        values, y, e = _exact(x[g][valid[g]]), _exact(out[g][valid[g]]), error[g][valid[g]].tolist()
        k = len(values)
        nu = k - case.correction
        mu = sum(values, Fraction(0)) / k if case.center else Fraction(0)
        var = sum(((v - mu) ** 2 for v in values), Fraction(0)) / nu
        if case.center:
            assert abs(sum(y, Fraction(0))) <= sum(e), f"group {g}: sum_V y = {float(sum(y))}"
        squares = sum((v * v for v in y), Fraction(0)) - nu * var / (var + Fraction(case.eps))
        bound = sum(ep * (2 * abs(float(v)) + 3 * ep) for ep, v in zip(e, y))
        assert abs(squares) <= bound, f"group {g}: sum_V y^2 - nu var/(var + eps) = {float(squares):.3g} > {bound:.3g}"


# idempotence: the first-order bound below holds with a second-order remainder of relative size
# O(k E) (the second derivatives of the normalization at s = 1 sum to O(k)(1 + |yhat_p|) per unit
# error squared); cases keep k E <= 1e-3, so 1 % covers it.
_SECOND_ORDER = 1.01


@pytest.mark.theorem("idempotence")
@dtypes
@given(data=st.data())
def test_idempotence(dtype, data):
    """With eps = 0, y2 = masked_norm(y) for y = masked_norm(x) (same mask, correction, center and
    policy) is y: bit for bit where y is x or 0 (degenerate groups, masked-out positions under
    "keep"/"zero"), and on P within B u (kappa2_p + 2 kappa_p + K (c + |yhat_p| sqrt(k/nu))), B =
    FORWARD_BOUND, kappa2 the kappa of y's groups, K the group's kappa and c = 1 centered, 0 RMS:
    y2 - y = (y2 - N(y)) + (N(y) - N(yhat)) + (yhat - y), the middle term the Jacobian of N at yhat
    (s = 1, entries delta_pj - c/k - yhat_p yhat_j/nu on V) applied to errors E, with
    sum_V |yhat_j| <= sqrt(k nu). Cases with k E > 1e-3 (float32, kappa beyond ~1e3) are left out:
    there y carries no digits to normalize again."""
    case = _plain(data.draw(cases(dtype, eps_values=(0.0,))))
    u, bound = ref.unit_roundoff(dtype), FORWARD_BOUND[dtype]
    counts = case.full_mask.sum(case.dims, keepdim=True).double()
    group_kappa = torch.from_numpy(ref.kappa(case.x, case.mask, case.dim, correction=case.correction, eps=0.0,
                                             center=case.center))
    normalized = ~(passes_through(case) | zeroed(case))
    assume(bool(((counts * bound * u * group_kappa)[normalized] <= 1e-3).all()))
    y = case.run()
    again = replace(case, x=y)
    y2 = again.run()
    assert torch.equal(y2[~normalized & ~zeroed(case)], y[~normalized & ~zeroed(case)])
    assert bool((y2[zeroed(case)] == 0).all())
    error = _forward_error(case)
    nu = (counts - case.correction).clamp(min=1)
    spread = group_kappa * ((1.0 if case.center else 0.0) + (y.double().abs() + error) * torch.sqrt(counts / nu))
    allowed = _SECOND_ORDER * (bound * u * (torch.from_numpy(again.kappa()) + spread) + 2 * error)
    gap = (y2.double() - y.double()).abs()
    assert bool((gap <= allowed)[normalized].all()), f"worst |y2 - y| / bound: {(gap / allowed)[normalized].max():.3g}"


@pytest.mark.theorem("gradient_orthogonality")
@dtypes
@given(data=st.data())
def test_gradient_orthogonality(dtype, data):
    """With eps = 0, for every non-degenerate group: |sum_P gx| <= sum_P D (centered) and
    |sum_P yhat gx| <= sum_P |yhat| D + u64 sum_P |yhat gx| (yhat: the reference's, rounded once
    to float64), D = VJP_X_BOUND u S; off V under "zero" gx is 0 and under "keep" the upstream
    gradient, exactly (the orthogonal part there is 0: P is V). Groups whose scale S exceeds the
    dtype's range are left out: their gradients may rightly overflow."""
    case = _plain(data.draw(cases(dtype, eps_values=(0.0,))))
    upstream = like(data.draw, case.x)
    gx = impl_vjp(case, upstream)[0]
    outside = ~case.full_mask
    if case.masked == "zero":
        assert bool((gx[outside] == 0).all())
    if case.masked == "keep":
        assert torch.equal(gx[outside], upstream[outside])
    allowed = VJP_X_BOUND[dtype] * ref.unit_roundoff(dtype) * Scales(case).grad_x(upstream)
    grads, y_hat, within, normalized = (
        grouped(case, t) for t in (gx, torch.from_numpy(case.y_hat()), allowed, draws_statistics(case)))
    for g in _live(case):
        p = normalized[g]
        if not bool((within[g][p] <= torch.finfo(dtype).max).all()):
            continue
        d, y, e = _exact(grads[g][p]), _exact(y_hat[g][p]), within[g][p].tolist()
        if case.center:
            assert abs(sum(d, Fraction(0))) <= math.fsum(e), f"group {g}: sum_P gx = {float(sum(d)):.3g}"
        paired = sum((a * b for a, b in zip(y, d)), Fraction(0))
        bound = math.fsum(abs(float(a)) * (ep + U64 * abs(float(b))) for a, b, ep in zip(y, d, e))
        assert abs(paired) <= bound, f"group {g}: sum_P yhat gx = {float(paired):.3g} > {bound:.3g}"
