"""WeightNorm's derivation (masknorm.spec.weight_norm): the derived closed forms are the stated
ones (STATEMENTS), a wrong statement or a wrong closed form is refused, and the generated plain-Python
forms equal central differences of the definition on floats."""

import dataclasses
import math

import numpy as np
import pytest
import sympy as sp

from masknorm.spec import derivation, weight_norm
from masknorm.spec import weight_norm_forms as wf
from masknorm.spec.derivation import DerivationError, canonicalizer


def test_derived_forms_are_the_stated_forms_with_their_signatures():
    forms = {f.name: f for f in weight_norm.closed_forms()}
    assert set(forms) == set(weight_norm.STATEMENTS) == set(wf.__all__)
    for name, f in forms.items():
        assert sp.expand(f.expr - weight_norm.STATEMENTS[name]) == 0
        assert list(map(str, f.args)) == list(getattr(wf, name).__code__.co_varnames[:len(f.args)])


def test_a_wrong_statement_is_reported(monkeypatch):
    wrong = dict(weight_norm.STATEMENTS, weight_norm_vjp_v=weight_norm.STATEMENTS["weight_norm_vjp_v"] * 2)
    monkeypatch.setattr(weight_norm, "STATEMENTS", wrong)
    with pytest.raises(DerivationError, match="weight_norm_vjp_v"):
        weight_norm.closed_forms.__wrapped__()


@pytest.mark.parametrize("wrong", [
    weight_norm.scale * weight_norm.inv_r * (weight_norm.gw_j - weight_norm.sum_m_gw_u * weight_norm.u_j),  # ungated
    weight_norm.scale * weight_norm.inv_r**2 * weight_norm.m_j * (weight_norm.gw_j - weight_norm.sum_m_gw_u * weight_norm.u_j),
])
def test_a_wrong_closed_form_is_refused_by_the_forward_check(wrong):
    f = next(f for f in weight_norm.closed_forms() if f.name == "weight_norm_vjp_v")
    assert canonicalizer()(wrong.xreplace(weight_norm.Rows().forward()) - f.derivative) != 0
    with pytest.raises(DerivationError):
        derivation._confirm(f.name, wrong, f.derivative, weight_norm.Rows())


def w_of(v, g, m):
    r = math.sqrt(sum(mi * vi * vi for mi, vi in zip(m, v)))
    return np.array([g * mi * vi / r for mi, vi in zip(m, v)])


@pytest.mark.parametrize("seed", range(4))
def test_generated_forms_equal_central_differences(seed):
    rng = np.random.default_rng(seed)
    v, m = rng.standard_normal(5), (rng.random(5) > 0.3).astype(float)
    m[0] = 1.0
    g, gw, vdot, gdot, h = rng.standard_normal(), rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal(), 1e-6
    inv_r = 1 / math.sqrt(float((m * v * v).sum()))
    u = v * inv_r
    total = float((m * gw * u).sum())
    numeric_vjp = [((w_of(v + h * e, g, m) - w_of(v - h * e, g, m)) @ gw) / (2 * h) for e in np.eye(5)]
    closed_vjp = [wf.weight_norm_vjp_v(gw[j], m[j], u[j], total, g, inv_r) for j in range(5)]
    assert np.allclose(closed_vjp, numeric_vjp, rtol=1e-7, atol=1e-9)
    numeric_g = ((w_of(v, g + h, m) - w_of(v, g - h, m)) @ gw) / (2 * h)
    assert wf.weight_norm_vjp_g(total) == pytest.approx(numeric_g, rel=1e-7, abs=1e-9)
    numeric_jvp = (w_of(v + h * vdot, g + h * gdot, m) - w_of(v - h * vdot, g - h * gdot, m)) / (2 * h)
    along = float((m * u * vdot).sum())
    closed_jvp = [wf.weight_norm_jvp(vdot[p], m[p], u[p], along, g, gdot, inv_r) for p in range(5)]
    assert np.allclose(closed_jvp, numeric_jvp, rtol=1e-7, atol=1e-9)
    jacobian = [[wf.weight_norm_jacobian_v(float(p == j), m[p], m[j], u[p], u[j], g, inv_r) for j in range(5)]
                for p in range(5)]
    assert np.allclose(np.array(jacobian).T @ gw, closed_vjp, rtol=1e-12, atol=1e-15)
    assert np.allclose([wf.weight_norm_jacobian_g(m[p], u[p]) for p in range(5)], w_of(v, 1.0, m), rtol=1e-12)


def test_expansion_confirms_small_rows_and_refuses_a_wrong_form(monkeypatch):
    assert weight_norm.expand_size(2).identities == 33
    forms = weight_norm.closed_forms()
    wrong = tuple(dataclasses.replace(f, expr=f.expr.xreplace({weight_norm.scale_dot: 2 * weight_norm.scale_dot}))
                  if f.name == "weight_norm_jvp" else f for f in forms)
    monkeypatch.setattr(weight_norm, "closed_forms", lambda: wrong)
    with pytest.raises(DerivationError, match=r"mask \(1, 0\)"):
        weight_norm._confirm_mask((1, 0))
