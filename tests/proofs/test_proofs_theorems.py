"""Every theorem of masknorm.proofs is proved: each residual of each variant reduces to exactly 0,
and the registry states each theorem (one-line statement, scope) in the issue's order."""

import pytest
import sympy as sp

from masknorm.proofs import structure
from masknorm.proofs.residual import reduce
from masknorm.proofs.theorems import EXPANDED, THEOREMS, prove

ISSUE_ORDER = [
    "shift_invariance", "scale_invariance", "output_moments", "padding_invariance", "closed_form_derivatives",
    "adjointness", "gradient_orthogonality", "idempotence", "inference_is_affine", "degenerate_passthrough",
    "permutation_equivariance", "valid_values_alone",
    "weight_norm_closed_forms", "weight_norm_scale_invariance", "weight_norm_row_norm", "weight_norm_vjp_orthogonality",
    "parallel_merge",
]


@pytest.mark.parametrize("theorem", THEOREMS, ids=lambda t: t.name)
def test_theorem_is_proved(theorem):
    residuals = theorem.residuals()
    assert residuals, "a theorem with no residual proves nothing"
    assert [r for r in residuals if r != 0] == []


def test_registry_states_each_theorem_once_in_the_issues_order():
    assert [t.name for t in THEOREMS] == ISSUE_ORDER
    for theorem in THEOREMS:
        assert ": " in theorem.statement and "\n" not in theorem.statement
        assert theorem.scope and ("generic n" in theorem.scope or "n <= " in theorem.scope
                                  or theorem.name == "inference_is_affine")


def test_theorems_11_and_12_are_generic_and_keep_their_expansions_beside_them():
    scopes = {t.name: t.scope for t in THEOREMS + EXPANDED}
    assert scopes["permutation_equivariance"].startswith("generic n")
    assert scopes["valid_values_alone"].startswith("generic n")
    assert scopes["permutation_equivariance_expanded"].startswith(f"n <= {structure.PERMUTATION_SIZE} ")
    assert scopes["valid_values_alone_expanded"].startswith(f"n <= {structure.SUBSET_SIZE} ")


@pytest.mark.parametrize("check, size", [(structure.permutation_equivariance_expanded, 4),
                                         (structure.valid_values_alone_expanded, 3)], ids=lambda v: str(v))
def test_expansions_hold_for_small_n(check, size):
    residuals = [r for center in (True, False) for r in check(center=center, size=size)]
    assert residuals and all(r == 0 for r in residuals)


@pytest.mark.thorough
@pytest.mark.parametrize("theorem", EXPANDED, ids=lambda t: t.name)
def test_expansions_hold_at_their_stated_sizes(theorem):
    assert prove(theorem).status == "proved"


def test_prove_reports_a_proved_theorem_with_its_time():
    outcome = prove(THEOREMS[0])
    assert outcome.status == "proved" and outcome.seconds >= 0 and outcome.detail == ""


def test_reduce_decides_identities_that_need_each_step():
    a = sp.Symbol("a", positive=True)
    v, e, y = sp.symbols("v e y")
    assert reduce(a * y / sp.sqrt(a**2 * v + e) - y / sp.sqrt(v + e / a**2)) == 0  # radical factoring
    assert reduce(y / (v + e) + e / (v**2 + v * e) - (y * v + e) / (v * (v + e))) == 0  # common denominator
    assert reduce(a * y / sp.sqrt(a**2 * v + e) - y / sp.sqrt(v + e / a)) != 0
    assert reduce(y / sp.sqrt(v), rationalize=False) != 0


def test_reduce_refuses_a_negative_scale_out_of_the_root():
    a = sp.Symbol("a", negative=True)
    v, y = sp.symbols("v y", positive=True)
    assert reduce(a * y / sp.sqrt(a**2 * v) - y / sp.sqrt(v)) != 0
    assert reduce(a * y / sp.sqrt(a**2 * v) + y / sp.sqrt(v)) == 0
