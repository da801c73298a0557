"""Every theorem has teeth: its check, run with a perturbed statement (a wrong sign, divisor, power,
scope or pairing) through the same code path, returns a non-zero residual."""

from types import SimpleNamespace

import pytest
import sympy as sp

from masknorm.proofs import derivatives, inference, invariance, merge, moments, structure, weight_norm
from masknorm.proofs.invariance import SCALE
from masknorm.spec import weight_norm_forms
from masknorm.proofs.theorems import EXPANDED, THEOREMS
from masknorm.spec import closed_forms
from masknorm.spec.definitions import P, beta, eps, gamma, k, m, n, nu, p, pi, sigma, x


def closed_with(**replacements):
    """The committed closed forms with some functions replaced by wrong ones."""
    return SimpleNamespace(**{name: getattr(closed_forms, name) for name in closed_forms.__all__} | replacements)


def jacobian_centered_wrong_sign(delta_pj, m_j, yhat_p, yhat_j, k, nu, inv_s):
    return inv_s * (delta_pj - m_j / k + m_j * yhat_j * yhat_p / nu)


def jacobian_rms_divisor_off_by_one(delta_pj, m_j, yhat_p, yhat_j, nu, inv_s):
    return inv_s * (delta_pj - m_j * yhat_j * yhat_p / (nu + 1))


def vjp_centered_k_for_nu(g_j, p_j, m_j, yhat_j, sum_p_g, sum_p_g_yhat, k, nu, inv_s):
    return inv_s * (g_j * p_j - m_j * sum_p_g_yhat * yhat_j / k - m_j * sum_p_g / k)


def vjp_centered_ungated(g_j, p_j, m_j, yhat_j, sum_p_g, sum_p_g_yhat, k, nu, inv_s):
    return inv_s * (g_j - m_j * sum_p_g_yhat * yhat_j / nu - m_j * sum_p_g / k)


def vjp_rms_wrong_sign(g_j, p_j, m_j, yhat_j, sum_p_g_yhat, nu, inv_s):
    return inv_s * (g_j * p_j + m_j * sum_p_g_yhat * yhat_j / nu)


def jvp_centered_mean_over_nu(xdot_p, yhat_p, sum_v_xdot, sum_v_yhat_xdot, k, nu, inv_s):
    return inv_s * (xdot_p - sum_v_yhat_xdot * yhat_p / nu - sum_v_xdot / nu)


def weight_grad_ungated(grad_out_j, yhat_j, p_j):
    return grad_out_j * yhat_j


def bias_grad_ungated(grad_out_j, p_j):
    return grad_out_j


def affine_jvp_wrong_sign(weight, yhat_dot, weight_dot, yhat, bias_dot):
    return bias_dot + weight * yhat_dot - weight_dot * yhat


def merge_unweighted(processes):
    """Flax-style: the plain average of the per-process means, M2 from the shifted rule around it."""
    k, _, m2 = merge.shifted(processes)
    return k, sum(p.mean for p in processes) / len(processes), m2


def merge_without_between_term(processes):
    return sum(p.k for p in processes), merge.shifted(processes)[1], sum(p.m2 for p in processes)


def merge_pair_divisor_k(processes):
    a, b = processes
    delta = b.mean - a.mean
    return a.k + b.k, a.mean + delta * b.k / (a.k + b.k), a.m2 + b.m2 + delta ** 2 * a.k * b.k / (a.k + b.k - 1)


def weight_norm_with(**replacements):
    """The committed WeightNorm closed forms with some functions replaced by wrong ones."""
    return SimpleNamespace(**{name: getattr(weight_norm_forms, name) for name in weight_norm_forms.__all__}
                           | replacements)


def wn_jacobian_v_ungated(delta_pj, m_p, m_j, u_p, u_j, g, inv_r):
    return g * inv_r * m_p * (delta_pj - u_j * u_p)


def wn_jacobian_g_unmasked(m_p, u_p):
    return u_p


def wn_vjp_v_sign(gw_j, m_j, u_j, sum_m_gw_u, g, inv_r):
    return g * inv_r * m_j * (gw_j + sum_m_gw_u * u_j)


def wn_vjp_v_ungated(gw_j, m_j, u_j, sum_m_gw_u, g, inv_r):
    return g * inv_r * (gw_j - sum_m_gw_u * u_j)


def wn_vjp_v_squared_norm(gw_j, m_j, u_j, sum_m_gw_u, g, inv_r):
    return g * inv_r * inv_r * m_j * (gw_j - sum_m_gw_u * u_j)


def wn_vjp_g_scaled(sum_m_gw_u):
    return 2 * sum_m_gw_u


def wn_jvp_without_gdot(vdot_p, m_p, u_p, sum_m_u_vdot, g, gdot, inv_r):
    return m_p * g * inv_r * (vdot_p - sum_m_u_vdot * u_p)


def wrong_mean(norm, q):
    return (x[q] - norm.mu) / sp.sqrt(norm.var)


# (label, center, closed form replaced, wrong function)
WRONG_CLOSED_FORMS = [
    ("jacobian sign", True, "jacobian_centered", jacobian_centered_wrong_sign),
    ("jacobian divisor", False, "jacobian_rms", jacobian_rms_divisor_off_by_one),
    ("vjp divisor", True, "vjp_centered", vjp_centered_k_for_nu),
    ("vjp not gated by P", True, "vjp_centered", vjp_centered_ungated),
    ("rms vjp sign", False, "vjp_rms", vjp_rms_wrong_sign),
    ("jvp divisor", True, "jvp_centered", jvp_centered_mean_over_nu),
    ("weight grad not gated", True, "weight_grad", weight_grad_ungated),
    ("bias grad not gated", True, "bias_grad", bias_grad_ungated),
    ("affine jvp sign", True, "affine_jvp", affine_jvp_wrong_sign),
]

PERTURBATIONS = {
    "shift_invariance": [
        ("RMS is not shift invariant", invariance.shift_invariance, dict(center=False)),
        ("wrong sign", invariance.shift_invariance, dict(claimed=lambda norm, q: -norm.yhat(q))),
        ("eps dropped", invariance.shift_invariance, dict(claimed=wrong_mean)),
    ],
    "scale_invariance": [
        *[(f"eps/a, center={c}", invariance.scale_invariance, dict(center=c, claimed_eps=lambda a: eps / a))
          for c in (True, False)],
        *[(f"a < 0, center={c}", invariance.scale_invariance, dict(center=c, scale=-SCALE)) for c in (True, False)],
        ("eps unscaled", invariance.scale_invariance, dict(claimed_eps=lambda a: eps)),
    ],
    "output_moments": [
        *[(f"divisor k for nu, center={c}", moments.output_moments,
           dict(center=c, claimed_squares=lambda norm: k * norm.var / norm.base)) for c in (True, False)],
        ("var - eps", moments.output_moments, dict(claimed_squares=lambda norm: nu * norm.var / (norm.var - eps))),
        ("summed over all positions", moments.output_moments, dict(weight=lambda q: 1,
                                                                   claimed_squares=moments._sum_of_squares)),
    ],
    "padding_invariance": [
        *[(f"valid inputs moved, center={c}", invariance.padding_invariance, dict(center=c, moved=lambda q: m[q]))
          for c in (True, False)],
        ("every input moved", invariance.padding_invariance, dict(moved=lambda q: 1)),
    ],
    "closed_form_derivatives": [
        (label, derivatives.closed_form_derivatives, dict(center=center, closed=closed_with(**{name: wrong})))
        for label, center, name, wrong in WRONG_CLOSED_FORMS
    ],
    "adjointness": [
        ("vjp divisor", derivatives.adjointness, dict(closed=closed_with(vjp_centered=vjp_centered_k_for_nu))),
        ("vjp not gated by P", derivatives.adjointness, dict(closed=closed_with(vjp_centered=vjp_centered_ungated))),
        ("rms vjp sign", derivatives.adjointness, dict(center=False, closed=closed_with(
            vjp_rms=vjp_rms_wrong_sign))),
        ("jvp divisor", derivatives.adjointness, dict(closed=closed_with(jvp_centered=jvp_centered_mean_over_nu))),
    ],
    "gradient_orthogonality": [
        ("valid-ones under normalize", derivatives.gradient_orthogonality, dict(weight=lambda q: m[q])),
        *[(f"eps > 0, center={c}", derivatives.gradient_orthogonality, dict(center=c, epsilon=eps))
          for c in (True, False)],
        ("vjp divisor", derivatives.gradient_orthogonality, dict(closed=closed_with(
            vjp_centered=vjp_centered_k_for_nu))),
    ],
    "idempotence": [
        *[(f"eps > 0, center={c}", moments.idempotence, dict(center=c, second_eps=eps)) for c in (True, False)],
        ("other correction", moments.idempotence, dict(second_nu=k)),
    ],
    "inference_is_affine": [
        ("intercept sign", inference.inference_is_affine,
         dict(claimed_intercept=lambda a: beta[p] + a * inference.RUNNING_MEAN)),
        ("slope without root", inference.inference_is_affine,
         dict(claimed_slope=lambda: gamma[p] / (inference.RUNNING_VAR + eps))),
    ],
    "degenerate_passthrough": [
        ("factor 2 dropped", moments.degenerate_passthrough, dict(claimed_spread=lambda norm: k * nu * norm.var)),
        ("divisor k for nu", moments.degenerate_passthrough, dict(center=False,
                                                                  claimed_spread=lambda norm: k * norm.var)),
    ],
    "permutation_equivariance": [
        *[(f"mask left in place, center={c}", structure.permutation_equivariance,
           dict(center=c, carried=(x, gamma, beta, P))) for c in (True, False)],
        ("weight left in place", structure.permutation_equivariance, dict(carried=(x, m, beta, P))),
        ("P left in place", structure.permutation_equivariance, dict(carried=(x, m, gamma, beta))),
        ("a map not declared a bijection", structure.permutation_equivariance,
         dict(permutation=sp.Function("f", integer=True, positive=True))),
    ],
    "parallel_merge": [
        ("unweighted mean of means", merge.parallel_merge, dict(rule=merge_unweighted)),
        ("between-process term dropped", merge.parallel_merge, dict(processes=3, rule=merge_without_between_term)),
        ("Chan divisor k - 1", merge.parallel_merge, dict(rule=merge_pair_divisor_k)),
    ],
    "valid_values_alone": [
        *[(f"all n values, masked-out ones too, center={c}", structure.valid_values_alone,
           dict(center=c, kept=lambda: ((lambda r: x[pi(r)]), n, pi))) for c in (True, False)],
        ("valid values counted as n", structure.valid_values_alone,
         dict(kept=lambda: ((lambda r: x[sigma(r)]), n, sigma))),
        ("correction dropped alone", structure.valid_values_alone, dict(alone_nu=k)),
        ("compared with the next valid value", structure.valid_values_alone,
         dict(center=False, rank=lambda r: r + 1)),
    ],
    "weight_norm_closed_forms": [
        (label, weight_norm.weight_norm_closed_forms, dict(closed=weight_norm_with(**{name: wrong})))
        for label, name, wrong in [
            ("jacobian not gated by m_j", "weight_norm_jacobian_v", wn_jacobian_v_ungated),
            ("jacobian in g unmasked", "weight_norm_jacobian_g", wn_jacobian_g_unmasked),
            ("vjp sign", "weight_norm_vjp_v", wn_vjp_v_sign),
            ("vjp over 1/r^2", "weight_norm_vjp_v", wn_vjp_v_squared_norm),
            ("vjp for g doubled", "weight_norm_vjp_g", wn_vjp_g_scaled),
            ("jvp without gdot", "weight_norm_jvp", wn_jvp_without_gdot),
        ]
    ],
    "weight_norm_scale_invariance": [
        ("a < 0", weight_norm.weight_norm_scale_invariance, dict(factor=-weight_norm.SCALE)),
        ("any real a", weight_norm.weight_norm_scale_invariance, dict(factor=sp.Symbol("a", real=True))),
    ],
    "weight_norm_row_norm": [
        ("pruned entries in the norm", weight_norm.weight_norm_row_norm,
         dict(definition=weight_norm.WeightNorm(lambda q: 1))),
        ("||w|| = g, not squared", weight_norm.weight_norm_row_norm, dict(claimed=lambda g: g)),
    ],
    "weight_norm_vjp_orthogonality": [
        ("vjp sign", weight_norm.weight_norm_vjp_orthogonality, dict(closed=weight_norm_with(
            weight_norm_vjp_v=wn_vjp_v_sign))),
        ("vjp not gated by m_j", weight_norm.weight_norm_vjp_orthogonality, dict(closed=weight_norm_with(
            weight_norm_vjp_v=wn_vjp_v_ungated))),
    ],
    "permutation_equivariance_expanded": [
        *[(f"mask left in place, center={c}", structure.permutation_equivariance_expanded,
           dict(center=c, size=2, carried=(x, gamma, beta, P))) for c in (True, False)],
        ("weight left in place", structure.permutation_equivariance_expanded, dict(size=2, carried=(x, m, beta, P))),
    ],
    "valid_values_alone_expanded": [
        ("all values, masked-out ones too", structure.valid_values_alone_expanded,
         dict(size=3, kept=lambda mask: list(range(1, len(mask) + 1)))),
        ("valid values in the wrong order", structure.valid_values_alone_expanded,
         dict(center=False, size=3, kept=lambda mask: structure._valid_positions(mask)[::-1])),
    ],
}

CASES = [pytest.param(check, kwargs, id=f"{name}: {label}")
         for name, cases in PERTURBATIONS.items() for label, check, kwargs in cases]


def test_every_theorem_has_perturbations():
    assert set(PERTURBATIONS) == {t.name for t in THEOREMS + EXPANDED}


@pytest.mark.parametrize("check, kwargs", CASES)
def test_perturbed_statement_leaves_a_residual(check, kwargs):
    residuals = check(**kwargs)
    assert residuals and any(r != 0 for r in residuals)
