"""The reference forward against hand-computed values, torch's unmasked layers, and the masking contract."""

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from masknorm.reference import masked_norm

NAN, INF = float("nan"), float("inf")


def arr(*values):
    return np.array(values, dtype=np.float64)


# ---- hand cases: every expected value below is worked out on paper ---------------------------


def test_centered_unbiased_hand_case():
    # mu = 1, sigma^2 = (1 + 0 + 1)/(3 - 1) = 1, s = 1
    out = masked_norm(arr(0, 1, 2), correction=1, eps=0)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, arr(-1, 0, 1))


def test_eps_enters_under_the_root():
    # mu = 0, sigma^2 = 1, s = sqrt(1 + 3) = 2
    np.testing.assert_array_equal(masked_norm(arr(-1, 1), eps=3.0), arr(-0.5, 0.5))


def test_rms_hand_case():
    # no centering: sigma^2 = (9 + 9)/2 = 9, s = 3 (a centered norm would give the same here, so
    # the second case has a nonzero mean: (4 + 4)/2 = 4, s = 2 -> [1, 1], centered would be degenerate)
    np.testing.assert_array_equal(masked_norm(arr(-3, 3), eps=0, center=False), arr(-1, 1))
    np.testing.assert_array_equal(masked_norm(arr(2, 2), eps=0, center=False), arr(1, 1))


@pytest.mark.parametrize(
    "masked, expected",
    [("normalize", arr(-1, 0, 1, 99)), ("keep", arr(-1, 0, 1, 100)), ("zero", arr(-1, 0, 1, 0))],
)
def test_policies_hand_case(masked, expected):
    # statistics from [0, 1, 2] only: mu = 1, s = 1; the masked-out 100 is (100 - 1)/1 = 99 under normalize
    mask = np.array([True, True, True, False])
    np.testing.assert_array_equal(masked_norm(arr(0, 1, 2, 100), mask, correction=1, eps=0, masked=masked), expected)


def test_affine_hand_case():
    # yhat = [-1, 0, 1]; out = [2*-1 + 1, 3*0 + 1, -1*1 + 1]
    out = masked_norm(arr(0, 1, 2), correction=1, eps=0, weight=arr(2, 3, -1), bias=arr(1, 1, 1))
    np.testing.assert_array_equal(out, arr(-1, 1, 0))


def test_affine_applies_to_masked_out_only_under_normalize():
    mask = np.array([True, True, True, False])
    w, b = arr(1, 1, 1, 2), arr(0, 0, 0, 5)
    x = arr(0, 1, 2, 3)
    np.testing.assert_array_equal(masked_norm(x, mask, correction=1, eps=0, weight=w, bias=b)[3], 2 * 2 + 5)
    np.testing.assert_array_equal(masked_norm(x, mask, correction=1, eps=0, weight=w, bias=b, masked="keep")[3], 3)
    np.testing.assert_array_equal(masked_norm(x, mask, correction=1, eps=0, weight=w, bias=b, masked="zero")[3], 0)


@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
def test_degenerate_groups_pass_through(masked):
    # row 0: eps = 0 and the valid values are equal; row 1: k = 1 = correction; row 2: k = 0
    x = np.array([[7.0, 7.0, 7.0, -2.5], [4.0, 1.0, 5.0, 9.0], [0.5, NAN, 3.0, 3.0]])
    mask = np.array([[True, True, True, False], [False, True, False, False], [False, False, False, False]])
    w, b = arr(2, 2, 2, 2), arr(1, 1, 1, 1)
    out = masked_norm(x, mask, correction=1, eps=0, weight=w, bias=b, masked=masked)
    expected = np.where(mask, x, 0.0) if masked == "zero" else x  # no affine on degenerate groups
    np.testing.assert_array_equal(out, expected)


def test_rms_degenerate_only_when_all_valid_are_zero():
    mask = np.array([True, True, False])
    np.testing.assert_array_equal(masked_norm(arr(0, 0, 5), mask, eps=0, center=False), arr(0, 0, 5))
    np.testing.assert_array_equal(masked_norm(arr(0, 0, 5), mask, eps=0, center=False, masked="zero"), arr(0, 0, 0))
    # not degenerate: sigma^2 = (0 + 4)/2 = 2, s = sqrt(2)
    out = masked_norm(arr(0, 2, 5), mask, eps=0, center=False)
    np.testing.assert_allclose(out, arr(0, 2, 5) / np.sqrt(2), rtol=2**-52)


def test_degenerate_test_is_exact_not_a_rounded_variance():
    # two values one float64 ulp apart: the variance is tiny but nonzero, so the group is NOT
    # degenerate and normalizes to [-1, 1] exactly (scale invariance)
    np.testing.assert_array_equal(masked_norm(arr(1, 1 + 2**-52), eps=0), arr(-1, 1))


def test_empty_group_is_degenerate():
    mask = np.array([[False, False], [True, True]])
    out = masked_norm(np.array([[NAN, 3.0], [1.0, 3.0]]), mask, eps=0)
    np.testing.assert_array_equal(out[0], [NAN, 3.0])
    np.testing.assert_array_equal(out[1], [-1, 1])


def test_reduction_over_a_tuple_of_axes():
    # group x[:, 0, :] = {0, 1, 2, 3}: mu = 1.5, sigma^2 = (2.25 + .25 + .25 + 2.25)/4 = 1.25;
    # group x[:, 1, :] is the same shifted by 10, so it normalizes to the same values
    x = np.array([[[0.0, 1.0], [10.0, 11.0]], [[2.0, 3.0], [12.0, 13.0]]])
    out = masked_norm(x, dim=(0, 2), eps=0)
    group = np.array([-1.5, -0.5, 0.5, 1.5]) / np.sqrt(1.25)
    np.testing.assert_allclose(out[:, 0, :].ravel(), group, rtol=2**-51)
    np.testing.assert_array_equal(out[:, 0, :], out[:, 1, :])
    np.testing.assert_array_equal(masked_norm(x, dim=(2, -3), eps=0), out)


def test_mask_and_affine_broadcast():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4))
    mask = np.array([[True, False, True, True]])
    w, b = rng.standard_normal(4), rng.standard_normal((3, 1))
    full = masked_norm(x, np.broadcast_to(mask, x.shape), weight=np.broadcast_to(w, x.shape), bias=np.broadcast_to(b, x.shape))
    np.testing.assert_array_equal(masked_norm(x, mask, weight=w, bias=b), full)


# ---- masked statistics equal the statistics of the valid values alone ------------------------


@given(
    st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=6),
    st.lists(st.booleans(), min_size=6, max_size=6),
    st.integers(0, 2),
    st.sampled_from([0.0, 1e-5, 0.5]),
    st.booleans(),
)
def test_valid_outputs_equal_the_compacted_group(values, mask, correction, eps, center):
    x = np.array(values)
    m = np.array(mask[: len(values)])
    compact = x[m]
    if compact.size == 0:
        return
    out = masked_norm(x, m, correction=correction, eps=eps, center=center)
    ref = masked_norm(compact, correction=correction, eps=eps, center=center)
    np.testing.assert_array_equal(out[m], ref)


@st.composite
def grouped_calls(draw):
    """x of a small random shape, reduction axes, a full mask, and a policy."""
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    dims = tuple(draw(st.sets(st.integers(-len(shape), -1), min_size=1)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), dims, rng.random(shape) < 0.6, draw(st.sampled_from(["normalize", "keep", "zero"]))


@given(grouped_calls())
def test_each_group_is_normalized_on_its_own(call):
    # the test's own grouping: move the reduced axes last with numpy, then each row is a 1-D call
    x, dims, mask, masked = call
    out = masked_norm(x, mask, dims, eps=1e-3, masked=masked)
    reduced = [d % x.ndim for d in dims]
    last = list(range(x.ndim - len(reduced), x.ndim))
    rows = lambda a: np.moveaxis(a, reduced, last).reshape(-1, np.prod([x.shape[d] for d in reduced]))  # noqa: E731
    for xr, mr, orow in zip(rows(x), rows(mask), rows(out)):
        if mr.any():
            np.testing.assert_array_equal(orow[mr], masked_norm(xr[mr], eps=1e-3))
        if masked != "normalize":  # (normalize's masked-out values: the hand cases above)
            np.testing.assert_array_equal(orow[~mr], xr[~mr] if masked == "keep" else 0.0)


def test_zero_size_inputs():
    assert masked_norm(np.zeros((0, 3))).shape == (0, 3)
    assert masked_norm(np.zeros((3, 0))).shape == (3, 0)


def test_precision_is_enough_to_round_once():
    # at 30 and at 80 digits the float64 results are the same roundings
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 6)) * 1e3 + 5e3
    np.testing.assert_array_equal(masked_norm(x, dps=30, eps=0), masked_norm(x, dps=80, eps=0))


# ---- torch's own layers, float64, mask=None --------------------------------------------------
# Tolerance: |ours - torch| <= 1e-13 + 1e-13 |ours| elementwise (outputs are O(1) with O(1) affine,
# torch's float64 kernels are within a few ulps of the exact result, so this has ~1000x headroom
# but would catch any wrong statistic, divisor or broadcast).

TOL = dict(rtol=1e-13, atol=1e-13)


def _t(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_matches_torch_layer_norm():
    x, w, b = _t(2, 3, 4, seed=0), _t(3, 4, seed=1), _t(3, 4, seed=2)
    expected = F.layer_norm(x, (3, 4), w, b, eps=1e-5).numpy()
    np.testing.assert_allclose(masked_norm(x, dim=(1, 2), weight=w, bias=b, eps=1e-5), expected, **TOL)


def test_matches_torch_rms_norm():
    x, w = _t(3, 5, seed=3), _t(5, seed=4)
    expected = F.rms_norm(x, (5,), w, eps=1e-6).numpy()
    np.testing.assert_allclose(masked_norm(x, weight=w, eps=1e-6, center=False), expected, **TOL)


def test_matches_torch_group_norm():
    n, c, length, groups = 2, 6, 3, 3
    x, w, b = _t(n, c, length, seed=5), _t(c, seed=6), _t(c, seed=7)
    expected = F.group_norm(x, groups, w, b, eps=1e-5).numpy()
    xg = x.reshape(n, groups, c // groups, length)
    out = masked_norm(
        xg, dim=(2, 3), eps=1e-5, weight=w.reshape(groups, c // groups, 1), bias=b.reshape(groups, c // groups, 1)
    )
    np.testing.assert_allclose(out.reshape(n, c, length), expected, **TOL)


def test_matches_torch_batch_norm_training():
    x, w, b = _t(4, 3, 2, seed=8), _t(3, seed=9), _t(3, seed=10)
    expected = F.batch_norm(x, None, None, w, b, training=True, eps=1e-5).numpy()
    out = masked_norm(x, dim=(0, 2), eps=1e-5, weight=w.reshape(3, 1), bias=b.reshape(3, 1))
    np.testing.assert_allclose(out, expected, **TOL)


# ---- exact conversion of every input dtype ---------------------------------------------------
# With eps = 0 two values one ulp apart normalize to exactly [-1, 1]; an inexact conversion that
# lost the last bit would make the group degenerate and return x itself.

ONE_ULP_ABOVE_ONE = {
    torch.float64: 2.0**-52,
    torch.float32: 2.0**-23,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
}


@pytest.mark.parametrize(
    "dtype, as_numpy",
    [(d, False) for d in ONE_ULP_ABOVE_ONE] + [(d, True) for d in ONE_ULP_ABOVE_ONE if d != torch.bfloat16],
)
def test_inputs_convert_exactly(dtype, as_numpy):
    # as_numpy: the same values as a numpy array of the same dtype (numpy has no bfloat16)
    ulp = ONE_ULP_ABOVE_ONE[dtype]
    x = torch.tensor([1.0, 1.0 + ulp, 1.0 + 2 * ulp], dtype=dtype)
    assert x[1].item() != 1.0  # the value is representable in this dtype
    x_in = x.numpy() if as_numpy else x
    np.testing.assert_array_equal(masked_norm(x_in, correction=1, eps=0), arr(-1, 0, 1))
    # a non-trivial group, checked against mpmath on the exact values written out by hand
    y = torch.tensor([1.0, 1.0 + ulp, 3.0], dtype=dtype)
    y_in = y.numpy() if as_numpy else y
    with mpmath.workdps(40):
        v = [mpmath.mpf(1), 1 + mpmath.mpf(ulp), mpmath.mpf(3)]
        mu = sum(v) / 3
        s = mpmath.sqrt(sum((t - mu) ** 2 for t in v) / 3)
        expected = [float((t - mu) / s) for t in v]
    np.testing.assert_array_equal(masked_norm(y_in, eps=0), expected)


@pytest.mark.skipif(np.finfo(np.longdouble).nmant <= 52, reason="long double is float64 on this platform")
def test_long_double_converts_exactly():
    ulp = np.longdouble(2) ** -np.finfo(np.longdouble).nmant
    x = np.array([1, 1 + ulp, 1 + 2 * ulp], dtype=np.longdouble)
    np.testing.assert_array_equal(masked_norm(x, correction=1, eps=0), arr(-1, 0, 1))


def test_eps_converts_exactly_as_the_binary_float():
    # eps = 0.1 is 0.1000000000000000055511151231257827...; at 30 digits the binary value shows
    from masknorm.reference.problem import prepare

    problem, _, _, _ = prepare(
        arr(1, 2), None, -1, correction=0, eps=0.1, center=True, weight=None, bias=None, masked="keep", dps=30
    )
    assert problem.eps == mpmath.mpf(0.1)
    with mpmath.workdps(30):
        assert problem.eps != mpmath.mpf("0.1")


def test_results_are_rounded_once():
    from masknorm.reference.convert import round_to_float64

    with mpmath.workdps(60):
        half_ulp = mpmath.mpf(2) ** -53
        assert round_to_float64(1 + half_ulp) == 1.0  # tie to even
        assert round_to_float64(1 + half_ulp + mpmath.mpf(2) ** -120) == 1 + 2**-52  # just above the tie
        assert round_to_float64(-(1 + half_ulp + mpmath.mpf(2) ** -120)) == -(1 + 2**-52)
        tiny = mpmath.mpf(2) ** -1074
        assert round_to_float64(tiny * mpmath.mpf("1.5")) == 2 * 2.0**-1074  # subnormal tie to even
        assert round_to_float64(tiny * mpmath.mpf("1.4")) == 2.0**-1074
        assert round_to_float64(mpmath.mpf(10) ** 400) == INF
        assert round_to_float64(-mpmath.mpf(10) ** 400) == -INF
