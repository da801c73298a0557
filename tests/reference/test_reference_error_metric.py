"""The error metric: kappa by hand, unit roundoffs, and errors in units of u * kappa."""

import numpy as np
import pytest
import torch

from masknorm.reference import error_in_ukappa, kappa, max_error_in_ukappa, unit_roundoff

NAN, INF = float("nan"), float("inf")


def test_kappa_hand_cases():
    # [0, 1, 2], c = 1, eps = 0: mu = 1, sigma = 1, s = 1 -> kappa = 2
    # [-1, 1], eps = 3: mu = 0, sigma = 1, s = 2 -> kappa = 1/2
    # [10, 12] masked with a garbage third value, RMS, eps = 0: sigma = s = sqrt(122) -> kappa = 1
    np.testing.assert_array_equal(kappa(np.array([0.0, 1.0, 2.0]), correction=1, eps=0), [2, 2, 2])
    np.testing.assert_array_equal(kappa(np.array([-1.0, 1.0]), eps=3.0), [0.5, 0.5])
    mask = np.array([True, True, False])
    np.testing.assert_array_equal(kappa(np.array([10.0, 12.0, NAN]), mask, eps=0, center=False), [1, 1, 1])


def test_kappa_grows_with_the_mean_over_the_spread():
    # [1e6 - 1, 1e6 + 1]: mu = 1e6, sigma = 1, s = 1 -> kappa = 1e6 + 1
    np.testing.assert_array_equal(kappa(np.array([1e6 - 1, 1e6 + 1]), eps=0), [1e6 + 1, 1e6 + 1])


def test_kappa_is_one_on_degenerate_groups_and_broadcasts_per_group():
    x = np.array([[5.0, 5.0], [0.0, 2.0]])
    np.testing.assert_array_equal(kappa(x, eps=0), [[1, 1], [2, 2]])
    # dim=0: column groups {5, 0} (mu 2.5, sigma 2.5 -> 2) and {5, 2} (mu 3.5, sigma 1.5 -> 10/3)
    np.testing.assert_allclose(kappa(x, dim=0, eps=0), [[2, 10 / 3], [2, 10 / 3]], rtol=2**-52)


@pytest.mark.parametrize(
    "dtype, u",
    [(torch.float64, 2.0**-53), (torch.float32, 2.0**-24), (torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8),
     (np.float64, 2.0**-53), (np.float32, 2.0**-24), ("float16", 2.0**-11)],
)
def test_unit_roundoff(dtype, u):
    assert unit_roundoff(dtype) == u


def test_unit_roundoff_rejects_non_float_dtypes():
    with pytest.raises(ValueError, match="dtype must be one of"):
        unit_roundoff(torch.int32)
    with pytest.raises(TypeError, match="dtype must be a torch or numpy floating dtype"):
        unit_roundoff(object())


def test_error_in_ukappa_counts_units():
    u = 2.0**-24
    ref = np.array([1.0, -0.5, 2.0, 0.25])
    k = np.array([1.0, 2.0, 4.0, 1.0])
    y = torch.tensor([1.0 + 2 * u, -0.5 - 4 * u, 2.0, 0.25 - u], dtype=torch.float32)  # all float32-exact
    err = error_in_ukappa(y, ref, k)
    np.testing.assert_array_equal(err, [2.0, 2.0, 0.0, 1.0])
    assert max_error_in_ukappa(y, ref, k) == 2.0
    assert max_error_in_ukappa(y, ref, k, np.array([False, False, True, True])) == 1.0
    assert max_error_in_ukappa(y, ref, k, np.zeros(4, bool)) == 0.0
    # the unit is the candidate's dtype unless another is named
    np.testing.assert_array_equal(error_in_ukappa(y, ref, k, dtype=torch.float16), err * 2.0**-13)


def test_error_in_ukappa_with_affine_scale():
    # scale = u (kappa |gamma| + |beta|) = u (2 * 3 + 2) = 8u
    u = 2.0**-53
    err = error_in_ukappa(np.array([1.0 + 4 * 2 * u]), np.array([1.0]), np.array([2.0]),
                          weight=np.array([-3.0]), bias=np.array([2.0]))
    np.testing.assert_array_equal(err, [1.0])


def test_error_in_ukappa_non_finite():
    ref = np.array([NAN, INF, 1.0, NAN, 1.0, 1.0])
    y = np.array([NAN, INF, NAN, 1.0, -INF, 1.0])
    k = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    np.testing.assert_array_equal(error_in_ukappa(y, ref, k), [0, 0, INF, INF, INF, 0])
    # a difference on a zero scale is infinitely wrong
    assert error_in_ukappa(np.array([1.5]), np.array([1.0]), np.array([0.0]))[0] == INF


def test_an_error_beyond_float64s_range_is_inf_without_a_warning():
    """|y - y_ref| / (u kappa) overflows for a difference of 1e300 on a tiny kappa: the error is inf,
    reported as such, and numpy's overflow warning (expected here) is not printed."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        err = error_in_ukappa(np.array([1e300, 1.0]), np.array([-1e300, 1.0]), np.array([1e-10, 1.0]))
    assert err[0] == INF and err[1] == 0.0
