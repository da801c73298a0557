"""Batch norm in inference: the spec's normalization with the running statistics in place of the
batch's is an affine map of x, the form fused inference kernels compute."""

from __future__ import annotations

from typing import Callable

import sympy as sp

from masknorm.proofs.residual import Residuals, reduced
from masknorm.spec.definitions import POLICIES, Normalization, beta, eps, gamma, p, x

RUNNING_MEAN = sp.Symbol("running_mean", real=True)
RUNNING_VAR = sp.Symbol("running_var", nonnegative=True)
NORMALIZE = next(policy for policy in POLICIES if policy.name == "normalize")


def _slope() -> sp.Expr:
    return gamma[p] / sp.sqrt(RUNNING_VAR + eps)


def _intercept(slope: sp.Expr) -> sp.Expr:
    return beta[p] - slope * RUNNING_MEAN


def inference_is_affine(claimed_slope: Callable[[], sp.Expr] = _slope,
                        claimed_intercept: Callable[[sp.Expr], sp.Expr] = _intercept) -> Residuals:
    """Inference batch norm is affine: out = a x + b with a = gamma/sqrt(rv + eps), b = beta - a rm.
    Scope: any position and channel, running statistics with rv + eps > 0, any eps, weight and bias."""
    running = Normalization(True, RUNNING_MEAN, RUNNING_VAR, RUNNING_VAR + eps, x.__getitem__)
    slope = claimed_slope()
    return reduced(running.out(p, NORMALIZE, gamma[p], beta[p]) - (slope * x[p] + claimed_intercept(slope)))
