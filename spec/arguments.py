"""The argument symbols of the closed forms (the names in `masknorm.spec.closed_forms`) and
CONTRACT.md's statement of each closed form in them.

Per non-degenerate group: k valid count, nu = k - c, inv_s = 1/s, yhat normalized values,
p_j = [j in P], m_j = [j in V], g = weight * grad_out, sum_v_* sums over V, sum_p_* over P.
"""

from __future__ import annotations

import sympy as sp

from masknorm.spec.definitions import k, nu

delta_pj, m_j, p_j, inv_s = sp.symbols("delta_pj m_j p_j inv_s")
yhat_p, yhat_j, yhat = sp.symbols("yhat_p yhat_j yhat")
xdot_p, sum_v_xdot, sum_v_yhat_xdot = sp.symbols("xdot_p sum_v_xdot sum_v_yhat_xdot")
g_j, sum_p_g, sum_p_g_yhat = sp.symbols("g_j sum_p_g sum_p_g_yhat")
grad_out_j = sp.Symbol("grad_out_j")
weight, weight_dot, bias_dot, yhat_dot = sp.symbols("weight weight_dot bias_dot yhat_dot")
mu = sp.Symbol("mu")  # the mean, used only while rewriting a derivative in the arguments

# CONTRACT.md, "Closed forms", transcribed
CONTRACT = {
    "jacobian_centered": inv_s * (delta_pj - m_j / k - yhat_p * yhat_j * m_j / nu),
    "jacobian_rms": inv_s * (delta_pj - yhat_p * yhat_j * m_j / nu),
    "vjp_centered": inv_s * (g_j * p_j - (m_j / k) * sum_p_g - (m_j * yhat_j / nu) * sum_p_g_yhat),
    "vjp_rms": inv_s * (g_j * p_j - (m_j * yhat_j / nu) * sum_p_g_yhat),
    "jvp_centered": inv_s * (xdot_p - sum_v_xdot / k - (yhat_p / nu) * sum_v_yhat_xdot),
    "jvp_rms": inv_s * (xdot_p - (yhat_p / nu) * sum_v_yhat_xdot),
    "affine_jvp": weight * yhat_dot + weight_dot * yhat + bias_dot,
}
