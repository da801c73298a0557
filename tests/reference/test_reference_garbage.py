"""Whatever a masked-out position holds (NaN, +-Inf, 1e300) changes no valid output of the reference,
forward, VJP (upstream zero there under "normalize", anything under "keep"/"zero") or JVP."""

import numpy as np
import pytest

from masknorm.reference import jvp, masked_norm, vjp

NAN, INF = float("nan"), float("inf")
GARBAGE = [NAN, INF, -INF, 1e300, -1e300]
MASK = np.array([[True, False, True, True, False], [False, True, True, False, True]])


def case(masked, center, seed):
    """Random x, weight, bias around MASK and the keyword arguments of one call."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(MASK.shape)
    kw = dict(correction=1, eps=0.0, center=center, weight=rng.standard_normal(5), bias=rng.standard_normal(5), masked=masked)
    return rng, x, kw


@pytest.mark.parametrize("garbage", GARBAGE)
@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
@pytest.mark.parametrize("center", [True, False])
def test_forward(garbage, masked, center):
    _, x, kw = case(masked, center, seed=1)
    clean = masked_norm(x, MASK, **kw)
    out = masked_norm(np.where(MASK, x, garbage), MASK, **kw)
    np.testing.assert_array_equal(out[MASK], clean[MASK])
    if masked == "keep":
        np.testing.assert_array_equal(out[~MASK], garbage)
    if masked == "zero":
        np.testing.assert_array_equal(out[~MASK], 0.0)


@pytest.mark.parametrize("garbage", GARBAGE)
@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
@pytest.mark.parametrize("center", [True, False])
def test_vjp(garbage, masked, center):
    rng, x, kw = case(masked, center, seed=2)
    go = rng.standard_normal(x.shape)
    # upstream gradient at masked-out positions: zero under normalize, garbage under keep / zero
    dirty_go = np.where(MASK, go, 0.0 if masked == "normalize" else garbage)
    clean = vjp(np.where(MASK, go, 0.0), x, MASK, **kw)
    dirty = vjp(dirty_go, np.where(MASK, x, garbage), MASK, **kw)
    np.testing.assert_array_equal(dirty[0][MASK], clean[0][MASK])
    np.testing.assert_array_equal(dirty[1], clean[1])
    np.testing.assert_array_equal(dirty[2], clean[2])
    if masked == "keep":
        np.testing.assert_array_equal(dirty[0][~MASK], garbage)
    else:
        np.testing.assert_array_equal(dirty[0][~MASK], 0.0)


@pytest.mark.parametrize("garbage", GARBAGE)
@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
@pytest.mark.parametrize("center", [True, False])
def test_jvp(garbage, masked, center):
    rng, x, kw = case(masked, center, seed=3)
    xd, wd = rng.standard_normal(x.shape), rng.standard_normal(5)
    clean = jvp(x, xd, MASK, weight_dot=wd, **kw)
    dirty = jvp(np.where(MASK, x, garbage), np.where(MASK, xd, garbage), MASK, weight_dot=wd, **kw)
    np.testing.assert_array_equal(dirty[MASK], clean[MASK])
    if masked == "keep":
        np.testing.assert_array_equal(dirty[~MASK], garbage)
    if masked == "zero":
        np.testing.assert_array_equal(dirty[~MASK], 0.0)
