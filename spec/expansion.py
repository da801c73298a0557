"""Confirm the generically derived closed forms by explicit expansion for n = 1..8.

For each size n and each mask of `concrete_masks(n)`, the definition is written out over symbols
x1..xn (gamma1.., gout1.., xdot1.., ...) with the 0/1 mask substituted before differentiating
(k = its count; nu stays a symbol), sympy differentiates it, and every derivative is compared
with the closed forms evaluated on the same group (sums written out): the residual must expand
to 0. Checked per (n, mask, variant): the Jacobian d yhat_p/d x_j for all p, j; per policy:
grad x_j, grad weight_j, grad bias_j of sum_q gout_q out_q and out_dot_p of
out(x + t xdot, gamma + t gammadot, beta + t betadot).

Residuals are expanded after the invertible linear change of variables (centered only)
x_q = M + d_q for the valid q but the last, x_last = M - sum d_q, under which mu = M and
x_q - mu = d_q: residuals stay short, and one is 0 in (M, d) exactly when it is 0 in x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import sympy as sp

from masknorm.spec import arguments as a
from masknorm.spec.definitions import (
    POLICIES, ConcreteGroup, Policy, concrete_masks, k, m, name_scale, normalization, nu, r, s, t,
)
from masknorm.spec.derivation import DerivationError, form

SIZES = tuple(range(1, 9))
MEAN, DEVIATION = sp.Symbol("M"), sp.IndexedBase("d")


@dataclass(frozen=True)
class Expansion:
    """What was confirmed for one group size: its masks and the number of identities."""

    size: int
    masks: tuple[tuple[int, ...], ...]
    identities: int


class _ConcreteCheck:
    """The identities of one (mask, centered or RMS) group, over symbols x1..xn, gamma1.., ..."""

    def __init__(self, mask: tuple[int, ...], center: bool):
        self.group = ConcreteGroup(mask)
        self.x, self.xdot, self.gamma, self.gamma_dot, self.beta, self.beta_dot, self.grad_out = (
            _symbols(name, self.group) for name in ("x", "xdot", "gamma", "gammadot", "beta", "betadot", "gout"))
        self.norm = normalization(self.group, center, self.x.__getitem__)
        self.suffix = "centered" if center else "rms"
        self.mask_values = {m[q]: self.group.m(q) for q in self.group.positions}
        self.common = {k: self.group.k, nu: self.group.nu, a.inv_s: 1 / s}
        self.count = 0
        self.change = _centering(self.group, self.x) if center else {}

    def yhat(self, q: int) -> sp.Expr:
        return (self.x[q] - self.norm.mu) / s

    def require(self, label: str, derived: sp.Expr, predicted: sp.Expr) -> None:
        residual = sp.expand((derived - predicted).xreplace(self.change))
        if residual != 0:
            raise DerivationError(f"mask {self.group.mask}, {self.suffix}, {label}: residual {residual}")
        self.count += 1

    def closed(self, name: str, values: dict[sp.Symbol, sp.Expr]) -> sp.Expr:
        return form(name).expr.xreplace({**self.common, **values})

    def jacobian(self) -> None:
        positions = self.group.positions
        for pos in positions:
            yhat = self.norm.yhat(pos)
            for col in positions:
                derived = name_scale(sp.diff(yhat, self.x[col]), self.norm)
                predicted = self.closed(f"jacobian_{self.suffix}", {
                    a.delta_pj: int(pos == col), a.m_j: self.group.m(col), a.yhat_p: self.yhat(pos),
                    a.yhat_j: self.yhat(col)})
                self.require(f"d yhat_{pos}/d x_{col}", derived, predicted)

    def policy(self, policy: Policy) -> None:
        group, norm, x, xdot, gamma, beta, grad_out = (
            self.group, self.norm, self.x, self.xdot, self.gamma, self.beta, self.grad_out)
        positions = group.positions
        on = {q: policy.normalized(q).xreplace(self.mask_values) for q in positions}
        loss = group.sum(lambda q: grad_out[q] * norm.out(q, policy, gamma[q], beta[q]), r).xreplace(self.mask_values)
        sums = {a.sum_p_g: sp.Add(*[on[q] * gamma[q] * grad_out[q] for q in positions]),
                a.sum_p_g_yhat: sp.Add(*[on[q] * gamma[q] * grad_out[q] * self.yhat(q) for q in positions]),
                a.sum_v_xdot: group.valid_sum(xdot.__getitem__, r),
                a.sum_v_yhat_xdot: group.valid_sum(lambda q: self.yhat(q) * xdot[q], r)}
        moving = normalization(group, norm.center, lambda q: x[q] + t * xdot[q])
        for q in positions:
            vjp = self.closed(f"vjp_{self.suffix}", {
                a.g_j: gamma[q] * grad_out[q], a.p_j: on[q], a.m_j: group.m(q), a.yhat_j: self.yhat(q), **sums})
            self.require(f"{policy.name}: grad x_{q}", name_scale(sp.diff(loss, x[q]), norm),
                         vjp + policy.keep * (1 - on[q]) * grad_out[q])
            self.require(f"{policy.name}: grad weight_{q}", name_scale(sp.diff(loss, gamma[q]), norm),
                         self.closed("weight_grad", {a.grad_out_j: grad_out[q], a.yhat_j: self.yhat(q), a.p_j: on[q]}))
            self.require(f"{policy.name}: grad bias_{q}", sp.diff(loss, beta[q]),
                         self.closed("bias_grad", {a.grad_out_j: grad_out[q], a.p_j: on[q]}))
            out_t = moving.out(q, policy, gamma[q] + t * self.gamma_dot[q], beta[q] + t * self.beta_dot[q])
            derived = name_scale(sp.diff(out_t.xreplace(self.mask_values), t).xreplace({t: 0}), norm)
            yhat_dot = self.closed(f"jvp_{self.suffix}", {a.xdot_p: xdot[q], a.yhat_p: self.yhat(q), **sums})
            affine = self.closed("affine_jvp", {a.weight: gamma[q], a.yhat_dot: yhat_dot,
                                                a.weight_dot: self.gamma_dot[q], a.yhat: self.yhat(q),
                                                a.bias_dot: self.beta_dot[q]})
            self.require(f"{policy.name}: out_dot_{q}", derived, on[q] * affine + policy.keep * (1 - on[q]) * xdot[q])


def _symbols(name: str, group: ConcreteGroup) -> dict[int, sp.Symbol]:
    """name1, ..., namen: one plain symbol per position (much faster in sympy than Indexed)."""
    return {q: sp.Symbol(f"{name}{q}") for q in group.positions}


def _centering(group: ConcreteGroup, x: dict[int, sp.Symbol]) -> dict[sp.Expr, sp.Expr]:
    """x_q -> M + d_q for the valid q but the last, x_last -> M - sum of those d_q."""
    valid = [q for q in group.positions if group.m(q)]
    change = {x[q]: MEAN + DEVIATION[q] for q in valid[:-1]}
    change[x[valid[-1]]] = MEAN - sp.Add(*[DEVIATION[q] for q in valid[:-1]])
    return change


STEPS_PER_GROUP = 1 + len(POLICIES)  # the Jacobian, then each policy


def confirm(mask: tuple[int, ...], center: bool, step: Callable[[], None] = lambda: None) -> int:
    """Check every identity of one concrete group; the number checked (raises DerivationError).

    step() is called after each of its STEPS_PER_GROUP steps."""
    check = _ConcreteCheck(mask, center)
    check.jacobian()
    step()
    for policy in POLICIES:
        check.policy(policy)
        step()
    return check.count


_DONE: dict[int, Expansion] = {}


def expand_size(size: int, progress: Optional[Callable[[int, int], None]] = None) -> Expansion:
    """Confirm all closed forms for one group size, over its masks, centered and RMS (once per process).

    progress(done, total) is called after each step of each group (confirm)."""
    if size not in _DONE:
        masks = tuple(concrete_masks(size))
        total, done = 2 * len(masks) * STEPS_PER_GROUP, 0

        def step() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        identities = sum(confirm(mask, center, step) for mask in masks for center in (True, False))
        _DONE[size] = Expansion(size, masks, identities)
    return _DONE[size]
