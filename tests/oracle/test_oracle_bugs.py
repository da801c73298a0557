"""Masked norms with bugs seen in real code fail the oracle, and the report names the violated
property and gives a reproduction that, run as printed, shows the wrong result."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from support.norms import EPS, eps_outside_sqrt, layer_norm, masked_statistics

import masknorm
from masknorm.reference.error import kappa, unit_roundoff
from masknorm.testing import FORWARD_BOUND, Semantics, check

EXAMPLES = 20


def variance_counts_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Valid mean, but the squared deviations of the zero-filled padding enter the variance."""
    xz, k, mu = masked_statistics(x, mask)
    var = ((xz - mu) ** 2).sum(-1, keepdim=True) / k
    return torch.where(k > 0, (x - mu) / torch.sqrt(var + EPS), x)


def masks_by_multiplication(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Padding removed by x * mask: NaN * 0 is NaN, and it spreads through the sums."""
    k = mask.expand(x.shape).sum(-1, keepdim=True)
    xm = x * mask
    mu = xm.sum(-1, keepdim=True) / k
    var = ((xm - mu) ** 2 * mask).sum(-1, keepdim=True) / k
    return torch.where(k > 0, (x - mu) / torch.sqrt(var + EPS), x)


def unbiased_variance(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Divides the squared deviations by k - 1 while claiming the biased variance (divisor k)."""
    xz, k, mu = masked_statistics(x, mask)
    var = torch.where(mask, (x - mu) ** 2, 0).sum(-1, keepdim=True) / (k - 1).clamp(min=1)
    return torch.where(k > 0, (x - mu) / torch.sqrt(var + EPS), x)


def where_trap(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Correct forward, but an all-masked group computes 0/0 in the branch torch.where discards, and
    its backward multiplies that NaN by the zero gradient: NaN gradients."""
    xz, k, mu = masked_statistics(x, mask)
    var = torch.where(mask, (x - mu) ** 2, 0).sum(-1, keepdim=True) / k
    return torch.where(k > 0, (x - mu) / torch.sqrt(var + EPS), x)


# Each bug fails exactly these properties: an accuracy bug (padding counted, the wrong divisor, eps
# outside the root) fails the accuracy properties and not "padding garbage" (its output does not
# depend on the padding's values); all but masknorm's own NaN-safe layer leak NaN padding into the
# gradient (0 * NaN in the backward of the padded outputs), and divide 0 by 0 in an empty group.
ACCURACY = {"forward vs reference", "gradient vs reference"}
LEAKS_GRADIENT = {"gradient vs reference", "gradient padding garbage"}
BUGS = [
    (variance_counts_padding, "float64", ACCURACY | LEAKS_GRADIENT),
    (masks_by_multiplication, "float64", {"padding garbage"} | LEAKS_GRADIENT),
    (unbiased_variance, "float32", ACCURACY | LEAKS_GRADIENT),
    (eps_outside_sqrt, "float64", ACCURACY | LEAKS_GRADIENT),
    (where_trap, "float64", LEAKS_GRADIENT),
]


@pytest.fixture(scope="module", params=BUGS, ids=lambda b: b[0].__name__)
def bug(request):
    fn, dtype, violated = request.param
    return fn, violated, check(fn, Semantics(-1, eps=EPS), grad=True, dtype=dtype, examples=EXAMPLES)


def test_the_violated_properties_fail_and_no_other(bug):
    _, violated, report = bug
    assert {p.name for p in report.failed} == violated
    assert f"FAIL {sorted(violated)[0]}" in str(report)


def test_an_accuracy_bug_fails_only_the_accuracy_properties():
    """masknorm's NaN-safe layer with eps 100 times the claimed one: wrong values where the spread
    is small, but no padding value reaches them and groups with no spread still give 0 (or x)."""

    def wrong_eps(x, mask):
        return masknorm.masked_norm(x, mask, -1, eps=100 * EPS)

    report = check(wrong_eps, Semantics(-1, eps=EPS), grad=True, dtype="float32", examples=EXAMPLES)
    assert {p.name for p in report.failed} == ACCURACY


def test_a_padding_failure_shows_garbage_in_padding_and_the_clean_input():
    report = check(masks_by_multiplication, Semantics(-1, eps=EPS), examples=EXAMPLES)
    failure = next(p for p in report.failed if p.name == "padding garbage")
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(failure.reproduction, namespace)  # noqa: S102 - the report's own code
    mask, x, clean = namespace["mask"], namespace["x"], namespace["x_clean"]
    assert not mask.all() and not torch.isfinite(x[~mask]).all() and torch.isfinite(clean).all()
    assert torch.equal(x[mask], clean[mask])
    np.testing.assert_array_equal(np.array(namespace["expected"]), masks_by_multiplication(clean, mask).numpy())


def test_the_report_says_why(bug):
    _, violated, report = bug
    for p in report.failed:
        assert p.reason and p.reproduction
        assert p.reason.startswith(("error ", "NaN or Inf", "non-finite")), p.reason


def test_the_reproduction_runs_and_shows_the_failure(bug):
    fn, violated, report = bug
    failure = next(p for p in report.failed if p.name in violated)
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(failure.reproduction, namespace)  # noqa: S102 - the report's own code, as a user would paste it
    assert printed.getvalue()
    expected = np.array(namespace["expected"])
    got = (namespace["x"].grad if "grad_out" in namespace else namespace["out"]).detach().double().numpy()
    assert namespace["fn"] is fn
    finite_mismatch = np.isfinite(got) != np.isfinite(expected)
    x = namespace["x"].detach()
    # forward: the oracle's scale u*kappa (kappa < 1 where eps dominates the variance); gradient: u(1 + |g*|)
    size = 1 + np.abs(expected) if "grad_out" in namespace else kappa(x, namespace.get("mask"), -1, eps=EPS)
    with np.errstate(invalid="ignore"):
        far = np.abs(got - expected) > FORWARD_BOUND * unit_roundoff(x.dtype) * size
    assert (finite_mismatch | far).any()


def test_where_trap_forward_is_right():
    report = check(where_trap, Semantics(-1, eps=EPS), examples=EXAMPLES)
    assert report.conforms


def test_squares_that_overflow_fail_only_with_the_extreme_switch():
    """torch's F.layer_norm squares float32 values near 1e37, which overflow; the oracle finds it
    once `extreme` draws such values (and masknorm, which scales first, passes them)."""
    assert check(layer_norm, Semantics(-1, eps=EPS), mask=False, dtype="float32", examples=EXAMPLES).conforms
    extreme = check(layer_norm, Semantics(-1, eps=EPS), mask=False, dtype="float32", extreme=True, examples=EXAMPLES)
    assert "forward vs reference" in {p.name for p in extreme.failed}
