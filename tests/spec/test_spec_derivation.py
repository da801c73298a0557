"""The generic derivation: closed forms derived from the definition, equal to CONTRACT.md, and
wrong closed forms rejected (non-zero canonical residual, DerivationError)."""

import dataclasses

import pytest
import sympy as sp

from masknorm.spec import arguments as a
from masknorm.spec import derivation
from masknorm.spec.definitions import POLICIES, k, nu, s
from masknorm.spec.derivation import DerivationError, Variant, canonicalizer, closed_forms, form

SIGNATURES = {
    "jacobian_centered": "delta_pj m_j yhat_p yhat_j k nu inv_s",
    "jacobian_rms": "delta_pj m_j yhat_p yhat_j nu inv_s",
    "jvp_centered": "xdot_p yhat_p sum_v_xdot sum_v_yhat_xdot k nu inv_s",
    "jvp_rms": "xdot_p yhat_p sum_v_yhat_xdot nu inv_s",
    "vjp_centered": "g_j p_j m_j yhat_j sum_p_g sum_p_g_yhat k nu inv_s",
    "vjp_rms": "g_j p_j m_j yhat_j sum_p_g_yhat nu inv_s",
    "affine_jvp": "weight yhat_dot weight_dot yhat bias_dot",
}

# deliberately wrong closed forms: a flipped sign, nu and k swapped as divisors, a dropped term
WRONG = {
    "jacobian_centered": [
        a.inv_s * (a.delta_pj - a.m_j / k + a.yhat_p * a.yhat_j * a.m_j / nu),
        a.inv_s * (a.delta_pj - a.m_j / k - a.yhat_p * a.yhat_j * a.m_j / k),
        a.inv_s * (a.delta_pj - a.m_j / nu - a.yhat_p * a.yhat_j * a.m_j / nu),
        a.inv_s * (a.delta_pj - a.yhat_p * a.yhat_j * a.m_j / nu),
    ],
    "jacobian_rms": [
        a.inv_s * (a.delta_pj + a.yhat_p * a.yhat_j * a.m_j / nu),
        a.inv_s * (a.delta_pj - a.yhat_p * a.yhat_j * a.m_j / k),
        a.inv_s * (a.delta_pj - a.m_j / k - a.yhat_p * a.yhat_j * a.m_j / nu),
    ],
    "vjp_centered": [
        a.inv_s * (a.g_j * a.p_j + a.m_j * a.sum_p_g / k - a.m_j * a.yhat_j * a.sum_p_g_yhat / nu),
        a.inv_s * (a.g_j * a.p_j - a.m_j * a.sum_p_g / k - a.m_j * a.yhat_j * a.sum_p_g_yhat / k),
        a.inv_s * (a.g_j - a.m_j * a.sum_p_g / k - a.m_j * a.yhat_j * a.sum_p_g_yhat / nu),
    ],
    "vjp_rms": [
        a.inv_s * (a.g_j * a.p_j - a.m_j * a.yhat_j * a.sum_p_g_yhat / k),
        a.inv_s * (a.g_j * a.p_j + a.m_j * a.yhat_j * a.sum_p_g_yhat / nu),
    ],
    "jvp_centered": [
        a.inv_s * (a.xdot_p - a.sum_v_xdot / nu - a.yhat_p * a.sum_v_yhat_xdot / nu),
        a.inv_s * (a.xdot_p - a.sum_v_xdot / k + a.yhat_p * a.sum_v_yhat_xdot / nu),
        a.inv_s * (a.xdot_p - a.sum_v_xdot / k - a.yhat_p * a.sum_v_yhat_xdot / k),
    ],
    "jvp_rms": [
        a.inv_s * (a.xdot_p - a.yhat_p * a.sum_v_yhat_xdot / k),
        a.inv_s * (a.xdot_p + a.yhat_p * a.sum_v_yhat_xdot / nu),
    ],
}


def variant_of(name):
    return Variant(not name.endswith("_rms"))


def test_names_and_argument_orders_are_the_contract():
    forms = {f.name: " ".join(map(str, f.args)) for f in closed_forms()}
    for name, signature in SIGNATURES.items():
        assert forms[name] == signature


@pytest.mark.parametrize("name", sorted(a.CONTRACT))
def test_derived_closed_form_equals_design(name):
    assert sp.expand(form(name).expr - a.CONTRACT[name]) == 0


@pytest.mark.parametrize("name", sorted(WRONG))
def test_derived_closed_form_reproduces_the_derivative(name):
    f = form(name)
    residual = canonicalizer()(f.expr.xreplace(variant_of(name).forward()) - f.derivative)
    assert residual == 0
    assert s in f.derivative.free_symbols and not set(f.args) & f.derivative.free_symbols - {k, nu}


@pytest.mark.parametrize("name,wrong", [(name, w) for name in sorted(WRONG) for w in WRONG[name]])
def test_wrong_closed_form_is_rejected(name, wrong):
    f = form(name)
    residual = canonicalizer()(wrong.xreplace(variant_of(name).forward()) - f.derivative)
    assert residual != 0
    with pytest.raises(DerivationError):
        derivation._confirm(name, wrong, f.derivative, variant_of(name))


def test_a_wrong_design_statement_is_reported(monkeypatch):
    wrong = dict(a.CONTRACT, jacobian_rms=WRONG["jacobian_rms"][1])
    monkeypatch.setattr(a, "CONTRACT", wrong)
    with pytest.raises(DerivationError, match="jacobian_rms"):
        derivation._normalization_forms(Variant(False))


def test_generic_checks_cover_every_policy_and_the_degenerate_rule():
    labels = derivation.generic_checks()
    for policy in POLICIES:
        for variant in ("centered", "rms"):
            assert sum(label.startswith(f"{policy.name}, {variant} (") for label in labels) == 5
        assert sum(label.startswith(f"degenerate, {policy.name}:") for label in labels) == 3


@pytest.mark.parametrize("name", ["vjp_centered", "jvp_rms", "weight_grad", "jacobian_centered"])
def test_policy_checks_reject_a_wrong_closed_form(monkeypatch, name):
    wrong = dataclasses.replace(form(name), expr=form(name).expr * 2)
    monkeypatch.setattr(derivation, "form", lambda n: wrong if n == name else form(n))
    center = not name.endswith("_rms")
    with pytest.raises(DerivationError):
        derivation.policy_checks(Variant(center), POLICIES[1])
