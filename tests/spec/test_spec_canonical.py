"""The canonicalizer's rewrite rules (R1-R6 of masknorm.spec.canonical), one by one."""

import sympy as sp

from masknorm.spec.canonical import Canonicalizer, Enumeration

n = sp.Symbol("n", integer=True, positive=True)
i, l, j, p = sp.symbols("i l j p", integer=True, positive=True)
c, k = sp.symbols("c k")
x, y, m, A = sp.IndexedBase("x"), sp.IndexedBase("y"), sp.IndexedBase("m"), sp.IndexedBase("A")
canon = Canonicalizer(indicators=[m], known_sums={sp.Sum(m[i], (i, 1, n)): k})
plain = Canonicalizer()


def S(body, index=i, lo=1, hi=n):
    return sp.Sum(body, (index, lo, hi))


def test_r1_linearity_splits_sums_of_terms():
    assert canon(S(x[i] + y[i]) - S(x[l], l) - S(y[l], l)) == 0
    assert canon(S((x[i] + y[i]) ** 2)) == canon(S(x[i] ** 2) + 2 * S(x[i] * y[i]) + S(y[i] ** 2))


def test_r1_linearity_pulls_out_factors_free_of_the_index():
    assert canon(S(c * x[p] * y[i])) == c * x[p] * canon(S(y[i]))
    assert canon(S(c * x[i]) - c * S(x[l], l)) == 0


def test_r2_constant_summand():
    assert canon(S(c)) == c * n
    assert canon(S(c, i, 2, n)) == sp.expand(c * (n - 1))


def test_r3_kronecker_delta_selects_the_free_index():
    assert canon(S(sp.KroneckerDelta(i, j) * x[i] * y[i])) == x[j] * y[j]
    assert canon(S(sp.KroneckerDelta(j, i) * c)) == c
    # two deltas: the second becomes delta_pj
    assert canon(S(sp.KroneckerDelta(i, j) * sp.KroneckerDelta(i, p) * x[i])) == sp.KroneckerDelta(j, p) * x[j]


def test_r3_applies_inside_nested_sums():
    nested = S(sp.KroneckerDelta(i, j) * S(sp.KroneckerDelta(l, i) * x[l], l))
    assert canon(nested) == x[j]


def test_without_r3_a_delta_sum_does_not_cancel_in_plain_sympy():
    expr = S(sp.KroneckerDelta(i, j) * x[i]) - x[j]
    assert sp.expand(expr) != 0
    assert canon(expr) == 0


def test_r4_indicator_powers_collapse_only_for_indicators():
    assert canon(m[j] ** 3 * x[j]) == m[j] * x[j]
    assert canon(S(m[i] ** 2 * x[i]) - S(m[l] * x[l], l)) == 0
    assert canon(x[j] ** 2) == x[j] ** 2
    assert canon(S(x[i] ** 2) - S(x[l], l)) != 0


def test_r5_one_canonical_dummy():
    first = canon(S(x[i] * y[i]))
    assert first == canon(S(x[l] * y[l], l))
    (index,) = first.variables
    assert index.name == "i_1"


def test_r5_nested_sums_that_depend_on_the_outer_index_get_distinct_dummies():
    left = canon(S(x[i] * S(A[i, l], l)))
    right = canon(sp.Sum(x[l] * sp.Sum(A[l, i], (i, 1, n)), (l, 1, n)))
    assert left == right
    assert left.variables[0].name == "i_2"
    (inner,) = left.function.atoms(sp.Sum)
    assert inner.variables[0].name == "i_1"


def test_r6_known_sums_are_replaced():
    assert canon(S(m[i])) == k
    assert canon(S(m[i] ** 2)) == k
    assert plain(S(m[i])) != k


def test_canonical_form_is_idempotent():
    expr = S(m[i] * (x[i] - S(m[l] * x[l], l) / k) ** 2) * S(sp.KroneckerDelta(i, j) * y[i])
    once = canon(expr)
    assert canon(once) == once


def test_nonzero_differences_stay_nonzero():
    assert not canon.is_zero(S(x[i]) - S(y[i]))
    assert not canon.is_zero(S(m[i] * x[i]) - S(x[i]))
    assert canon.is_zero(S(m[i] * x[i]) - S(m[l] * x[l], l))


pi, sigma, f = (sp.Function(name, integer=True, positive=True) for name in ("pi", "sigma", "f"))
reindexing = Canonicalizer(indicators=[m], known_sums={sp.Sum(m[i], (i, 1, n)): k}, enumerations=[
    Enumeration(pi, n, n, lambda q: 1), Enumeration(sigma, k, n, m.__getitem__)])


def test_r7_a_permutation_reindexes_a_sum_whose_index_occurs_only_through_it():
    assert reindexing(S(m[pi(i)] * x[pi(i)] ** 2) - S(m[l] * x[l] ** 2, l)) == 0
    assert reindexing(S(m[pi(i)])) == k
    assert reindexing(S(x[pi(i)] * S(y[pi(l)], l))) == reindexing(S(x[i]) * S(y[i]))


def test_r7_the_valid_enumeration_turns_a_sum_over_1_to_k_into_a_masked_sum():
    assert reindexing(S(x[sigma(i)], i, 1, k) - S(m[i] * x[i])) == 0
    assert reindexing(S(m[sigma(i)], i, 1, k)) == k
    assert reindexing(S(c, i, 1, k)) == c * k  # R2, not R7


def test_r7_leaves_sums_it_cannot_reindex():
    assert reindexing(S(m[i] * x[pi(i)])) != reindexing(S(m[i] * x[i]))  # index also bare
    assert reindexing(S(x[sigma(i)], i, 1, n)) != reindexing(S(m[i] * x[i]))  # limit is not the count k
    assert reindexing(S(x[sigma(i)], i, 0, k - 1)) != reindexing(S(m[i] * x[i]))  # not from 1
    assert reindexing(S(x[f(i)])) != reindexing(S(x[i]))  # f is not declared a bijection
    assert canon(S(x[pi(i)])) != canon(S(x[i]))  # nor is pi without the declaration
