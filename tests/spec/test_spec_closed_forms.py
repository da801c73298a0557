"""The generated plain-Python closed forms: on floats they equal sympy's derivative of the
definition at random points, their text is plain arithmetic, and importing them needs no sympy."""

import subprocess
import sys

import numpy as np
import pytest
import sympy as sp

import masknorm.spec.closed_forms as cf
from masknorm.spec.definitions import ConcreteGroup, normalization
from masknorm.spec.printing import arithmetic

CASES = [(seed, center) for seed in range(6) for center in (True, False)]


def random_group(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 7))
    mask = rng.integers(0, 2, size)
    mask[rng.integers(size)] = 1
    mask[rng.integers(size)] = 0  # at least one masked-out position
    if mask.sum() < 2:
        mask[np.flatnonzero(mask == 0)[0]] = 1
    correction = int(rng.integers(0, 2))
    eps = float(rng.uniform(0.0, 0.5))
    return rng, tuple(int(v) for v in mask), correction, eps


def sympy_derivatives(mask, correction, eps, center, x_val, xdot_val, g_val):
    """Jacobian, VJP and JVP of yhat by sympy differentiation of the definition, evaluated."""
    group = ConcreteGroup(mask, nu=sp.Integer(sum(mask) - correction))
    xs = [sp.Symbol(f"x{q}") for q in group.positions]
    norm = normalization(group, center, lambda q: xs[q - 1])
    yhat = [norm.yhat(q).subs(sp.Symbol("epsilon", nonnegative=True), sp.Float(eps, 30)) for q in group.positions]
    point = {sym: sp.Float(v, 30) for sym, v in zip(xs, x_val)}
    jac = np.array([[float(sp.diff(y, xj).evalf(30, subs=point)) for xj in xs] for y in yhat])
    return jac, jac.T @ g_val, jac @ xdot_val


@pytest.mark.parametrize("seed,center", CASES)
def test_closed_forms_on_floats_equal_sympy_derivatives(seed, center):
    rng, mask, correction, eps = random_group(seed)
    size = len(mask)
    x = rng.normal(size=size) * 3 + 1
    xdot, g_up = rng.normal(size=size), rng.normal(size=size)
    policy_p = np.array(mask if seed % 2 else [1] * size, dtype=float)  # "keep"/"zero" or "normalize"
    m = np.array(mask, dtype=float)
    k, nu = m.sum(), m.sum() - correction
    mu = (m * x).sum() / k if center else 0.0
    inv_s = 1 / np.sqrt((m * (x - mu) ** 2).sum() / nu + eps)
    yhat = (x - mu) * inv_s

    jac, _, jvp = sympy_derivatives(mask, correction, eps, center, x, xdot, g_up)
    vjp = jac.T @ (policy_p * g_up)
    for p in range(size):
        for j in range(size):
            args = (float(p == j), m[j], yhat[p], yhat[j]) + ((k,) if center else ()) + (nu, inv_s)
            got = (cf.jacobian_centered if center else cf.jacobian_rms)(*args)
            assert got == pytest.approx(jac[p, j], rel=1e-10, abs=1e-12)
    sum_v_xdot, sum_v_yhat_xdot = (m * xdot).sum(), (m * yhat * xdot).sum()
    sum_p_g, sum_p_g_yhat = (policy_p * g_up).sum(), (policy_p * g_up * yhat).sum()
    for q in range(size):
        if center:
            jvp_q = cf.jvp_centered(xdot[q], yhat[q], sum_v_xdot, sum_v_yhat_xdot, k, nu, inv_s)
            vjp_q = cf.vjp_centered(g_up[q], policy_p[q], m[q], yhat[q], sum_p_g, sum_p_g_yhat, k, nu, inv_s)
        else:
            jvp_q = cf.jvp_rms(xdot[q], yhat[q], sum_v_yhat_xdot, nu, inv_s)
            vjp_q = cf.vjp_rms(g_up[q], policy_p[q], m[q], yhat[q], sum_p_g_yhat, nu, inv_s)
        assert jvp_q == pytest.approx(jvp[q], rel=1e-10, abs=1e-12)
        assert vjp_q == pytest.approx(vjp[q], rel=1e-10, abs=1e-12)


def test_affine_and_parameter_gradients_on_floats():
    assert cf.affine_jvp(2.0, 3.0, 5.0, 7.0, 11.0) == 2.0 * 3.0 + 5.0 * 7.0 + 11.0
    assert cf.weight_grad(3.0, 0.5, 1.0) == 1.5 and cf.weight_grad(3.0, 0.5, 0.0) == 0.0
    assert cf.bias_grad(3.0, 1.0) == 3.0 and cf.bias_grad(3.0, 0.0) == 0.0


def test_closed_forms_import_no_sympy():
    code = "import sys, masknorm.spec.closed_forms; print('sympy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_printer_emits_plain_arithmetic_only():
    a, b, c = sp.symbols("a b c")
    assert arithmetic(a * b**2 / c**3) == "a*(b*b)/(c*c*c)"
    for expr in (a * b**2 / c**3, (a - b) ** 3 / (a + c) ** 2, -a / (b * c) ** 2, 1 / (a - b) + c**-2):
        text = arithmetic(expr)
        assert eval(text, {"a": 1.25, "b": -0.5, "c": 3.0}) == pytest.approx(float(expr.subs({a: 1.25, b: -0.5, c: 3})))
    for bad in (a / 2, sp.sqrt(a), sp.exp(a), sp.Float(0.5) * a, a ** sp.Rational(3, 2)):
        with pytest.raises(ValueError):
            arithmetic(bad)
