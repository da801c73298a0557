"""The reference's eps-outside variant, s = sigma + eps: a hand case, and its VJP/JVP against
mpmath's numerical differentiation of its own forward (the closed forms with nu -> nu sigma/s)."""

import mpmath
import numpy as np
import pytest

from masknorm.reference import jvp, masked_norm, vjp
from masknorm.reference.error import kappa

DIFF_DPS = 30


def test_hand_case():
    # x = [0, 1, 2]: mu = 1, sigma = sqrt(2/3) (biased); eps outside: s = sigma + 1/2
    x = np.array([0.0, 1.0, 2.0])
    s = mpmath.sqrt(mpmath.mpf(2) / 3) + mpmath.mpf(0.5)
    want = [float(-1 / s), 0.0, float(1 / s)]
    np.testing.assert_array_equal(masked_norm(x, eps=0.5, eps_outside=True), want)
    assert masked_norm(x, eps=0.5)[0] != want[0]  # the default puts eps inside: a different value
    assert kappa(x, eps=0.5, eps_outside=True)[0] == pytest.approx(float((1 + mpmath.sqrt(mpmath.mpf(2) / 3)) / s))


def _numeric_jacobian(x, mask, options):
    """d out_p / d x_j by mpmath.diff of the reference forward evaluated at DIFF_DPS digits."""
    n = x.size
    jac = np.zeros((n, n))
    for j in range(n):
        for p in range(n):

            def f(t, p=p, j=j):
                xs = [mpmath.mpf(v) for v in x.ravel()]
                xs[j] = t
                k = sum(mask)
                mean = mpmath.fsum(v for v, m in zip(xs, mask) if m) / k if options["center"] else 0
                sigma = mpmath.sqrt(mpmath.fsum((v - mean) ** 2 for v, m in zip(xs, mask) if m) / (k - options["correction"]))
                return (xs[p] - mean) / (sigma + options["eps"])

            with mpmath.workdps(DIFF_DPS):
                jac[p, j] = float(mpmath.diff(f, mpmath.mpf(x.ravel()[j])))
    return jac


@pytest.mark.parametrize("center, correction", [(True, 0), (True, 1), (False, 0)])
def test_vjp_and_jvp_match_numerical_differentiation(center, correction):
    x = np.array([0.3, -1.25, 2.0, 7.5])
    mask = [True, True, True, False]
    options = dict(eps=0.125, center=center, correction=correction)
    jac = _numeric_jacobian(x, mask, options)
    go = np.array([1.0, -2.0, 0.5, 0.25])
    xd = np.array([0.5, 1.0, -1.0, 2.0])
    gx, _, _ = vjp(go, x, np.array(mask), eps_outside=True, **options)
    np.testing.assert_allclose(gx, go @ jac, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(jvp(x, xd, np.array(mask), eps_outside=True, **options), jac @ xd, rtol=1e-14, atol=1e-15)


def test_constant_group_has_the_derivative_of_x_over_eps():
    # sigma = 0: yhat = (x - mu)/eps + O(|dx|^2), so d yhat_p / d x_j = (delta_pj - 1/k)/eps
    x = np.array([2.0, 2.0, 2.0])
    gx, _, _ = vjp(np.array([1.0, 0.0, 0.0]), x, eps=0.5, eps_outside=True)
    np.testing.assert_allclose(gx, np.array([2 / 3, -1 / 3, -1 / 3]) / 0.5, rtol=1e-15)
