"""The reference VJP/JVP (the spec's closed forms on mpf values) against hand cases, against
mpmath's own numerical differentiation of the reference forward, and against each other."""

import dataclasses

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from masknorm.reference import jvp, masked_norm, vjp
from masknorm.reference.convert import to_mpf
from masknorm.reference.derivatives import jvp_mp, vjp_mp
from masknorm.reference.forward import normalize_mp
from masknorm.reference.problem import prepare

NAN, INF = float("nan"), float("inf")
DIGITS = 25  # required agreement with numerical differentiation
DPS = 50  # closed forms
DIFF_DPS = 30  # mpmath.diff works at twice this plus guard digits and reaches about this many


def arr(*values):
    return np.array(values, dtype=np.float64)


# ---- hand cases ------------------------------------------------------------------------------
# x = [0, 1, 2], c = 1, eps = 0: mu = 1, s = 1, k = 3, nu = 2, yhat = [-1, 0, 1]
# d yhat_p / d x_j = delta_pj - 1/3 - yhat_p yhat_j / 2; its column / row j = 0 is [1/6, -1/3, 1/6]


def test_vjp_hand_case():
    gx, gw, gb = vjp(arr(1, 0, 0), arr(0, 1, 2), correction=1, eps=0)
    np.testing.assert_array_equal(gx, [1 / 6, -1 / 3, 1 / 6])
    assert gw is None and gb is None


def test_jvp_hand_case():
    np.testing.assert_array_equal(jvp(arr(0, 1, 2), arr(1, 0, 0), correction=1, eps=0), [1 / 6, -1 / 3, 1 / 6])


def test_affine_gradients_hand_case():
    # grad_weight = grad_out * yhat = [2 * -1, 3 * 0, 5 * 1]; grad_bias = grad_out
    # g = weight * grad_out = [2, 6, -5]: sum g = 3, sum g yhat = -7; gx = g - 3/3 + 7 yhat/2
    go, w = arr(2, 3, 5), arr(1, 2, -1)
    gx, gw, gb = vjp(go, arr(0, 1, 2), correction=1, eps=0, weight=w, bias=arr(0, 0, 0))
    np.testing.assert_array_equal(gw, [-2, 0, 5])
    np.testing.assert_array_equal(gb, [2, 3, 5])
    np.testing.assert_array_equal(gx, [2 - 1 - 3.5, 6 - 1, -5 - 1 + 3.5])


def test_affine_gradients_sum_over_broadcast_axes():
    # two identical groups [0, 1, 2]: grad_weight / grad_bias of a (3,) weight add both rows
    x = np.array([[0.0, 1, 2], [0, 1, 2]])
    go = np.array([[1.0, 1, 1], [2, 0, 1]])
    _, gw, gb = vjp(go, x, correction=1, eps=0, weight=arr(1, 1, 1), bias=np.zeros((1, 1)))
    np.testing.assert_array_equal(gw, [-1 - 2, 0, 1 + 1])
    np.testing.assert_array_equal(gb, [[6.0]])


@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
def test_masked_out_positions_by_policy(masked):
    # stats from [0, 1, 2]; the masked-out position 3 (x = 5, yhat = 4): normalize -> its own
    # derivative 1/s = 1 and it feeds sum_P g, sum_P g yhat; keep -> identity; zero -> 0
    mask = np.array([True, True, True, False])
    x, go = arr(0, 1, 2, 5), arr(0, 0, 0, 1)
    gx, _, _ = vjp(go, x, mask, correction=1, eps=0, masked=masked)
    expected = {
        "normalize": [5 / 3, -1 / 3, -7 / 3, 1],  # -1/3 - 2 yhat_j on the valid ones
        "keep": [0, 0, 0, 1],
        "zero": [0, 0, 0, 0],
    }[masked]
    np.testing.assert_array_equal(gx, expected)
    yd = jvp(x, arr(0, 0, 0, 1), mask, correction=1, eps=0, masked=masked)
    np.testing.assert_array_equal(yd, {"normalize": [0, 0, 0, 1], "keep": [0, 0, 0, 1], "zero": [0, 0, 0, 0]}[masked])


@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
def test_degenerate_groups_have_identity_derivatives(masked):
    # row 0: eps = 0 and valid values equal; row 1: k = 1 = correction
    x = np.array([[3.0, 3.0, -1.0], [1.0, 2.0, 4.0]])
    mask = np.array([[True, True, False], [False, True, False]])
    go = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    w = arr(2, 2, 2)
    gx, gw, gb = vjp(go, x, mask, correction=1, eps=0, weight=w, bias=w, masked=masked)
    expected = np.where(mask, go, 0.0) if masked == "zero" else go
    np.testing.assert_array_equal(gx, expected)
    np.testing.assert_array_equal(gw, [0, 0, 0])
    np.testing.assert_array_equal(gb, [0, 0, 0])
    yd = jvp(x, go, mask, correction=1, eps=0, weight=w, bias=w, weight_dot=w, bias_dot=w, masked=masked)
    np.testing.assert_array_equal(yd, expected)


# ---- against mpmath's numerical differentiation of the reference forward -----------------------


def agreement_digits(a, b):
    """min over components of -log10(|a - b| / max(1, |b|)) (inf where equal)."""
    worst = mpmath.inf
    for u, v in zip(np.ravel(a), np.ravel(b)):
        d = abs(u - v)
        if d:
            worst = min(worst, -mpmath.log10(d / max(1, abs(v))))
    return worst


def make_case(center, masked, seed, affine=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 4))
    mask = rng.random((3, 4)) < 0.7
    mask[0] = [True, True, False, True]
    mask[2] = [False, True, False, False]  # k = 1 = correction: degenerate by count, differentiable
    w, b = (rng.standard_normal(4), rng.standard_normal((3, 1))) if affine else (None, None)
    kw = dict(correction=1, eps=1e-3, center=center, masked=masked)
    return x, mask, w, b, kw, rng


def perturbed(problem, prims, dirs, t):
    """The problem with (x, weight, bias) = prims + t * dirs (all in their own shapes, mpf)."""
    lay = problem.layout
    new = {name: None if p is None else lay.to_groups(p + t * d) for name, p, d in zip(("x", "weight", "bias"), prims, dirs)}
    return dataclasses.replace(problem, **new)


def numerical(f):
    with mpmath.workdps(DIFF_DPS):
        return mpmath.diff(f, 0)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
def test_jvp_matches_numerical_differentiation(center, masked):
    x, mask, w, b, kw, rng = make_case(center, masked, seed=1)
    dirs_f = [rng.standard_normal(x.shape), rng.standard_normal(w.shape), rng.standard_normal(b.shape)]
    problem, extra, wd, bd = prepare(x, mask, -1, weight=w, bias=b, dps=DPS, like_x={"x_dot": dirs_f[0]},
                                     like_weight=dirs_f[1], like_bias=dirs_f[2], **kw)
    with mpmath.workdps(DPS):
        closed = jvp_mp(problem, extra["x_dot"], wd, bd)
        prims = [to_mpf(a) for a in (x, w, b)]
        dirs = [to_mpf(a) for a in dirs_f]
    cache = {}

    def out(t):
        if t not in cache:
            cache[t] = normalize_mp(perturbed(problem, prims, dirs, t))
        return cache[t]

    num = np.array([numerical(lambda t, i=i: out(t)[i]) for i in np.ndindex(x.shape)], dtype=object).reshape(x.shape)
    assert agreement_digits(closed, num) >= DIGITS


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
def test_vjp_matches_numerical_differentiation(center, masked):
    x, mask, w, b, kw, rng = make_case(center, masked, seed=2)
    v = rng.standard_normal(x.shape)
    problem, extra, _, _ = prepare(x, mask, -1, weight=w, bias=b, dps=DPS, like_x={"grad_out": v}, **kw)
    with mpmath.workdps(DPS):
        closed = vjp_mp(problem, extra["grad_out"])
        prims = [to_mpf(a) for a in (x, w, b)]
        v_mp = to_mpf(v)
    for which, prim in enumerate(prims):
        num = np.empty(prim.shape, dtype=object)
        for i in np.ndindex(prim.shape):
            dirs = [np.zeros(p.shape) for p in prims]
            dirs[which][i] = 1.0
            dirs = [to_mpf(d) for d in dirs]

            def f(t):
                y = normalize_mp(perturbed(problem, prims, dirs, t))
                return dot(v_mp, y)

            num[i] = numerical(f)
        assert agreement_digits(closed[which], num) >= DIGITS, ("x", "weight", "bias")[which]


# ---- adjoint identity <v, J u> = <J^T v, u> ------------------------------------------------------


def dot(a, b):
    return mpmath.fsum(p * q for p, q in zip(np.ravel(a), np.ravel(b)))


def assert_adjoint(problem, extra, wdg, bdg, tangents, v):
    """<v, J (x_dot, weight_dot, bias_dot)> = <J^T v, (x_dot, weight_dot, bias_dot)> to DPS - 5 digits;
    returns the VJP (grad_x, grad_weight, grad_bias)."""
    with mpmath.workdps(DPS):
        yd = jvp_mp(problem, extra["x_dot"], wdg, bdg)
        grads = vjp_mp(problem, extra["grad_out"])
        lhs = dot(to_mpf(v), yd)
        rhs = mpmath.fsum(dot(g, to_mpf(t)) for g, t in zip(grads, tangents))
        assert abs(lhs - rhs) <= mpmath.mpf(10) ** (-DPS + 5) * (1 + abs(lhs))
    return grads


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
def test_adjoint_identity(center, masked):
    x, mask, w, b, kw, rng = make_case(center, masked, seed=3)
    u, wd, bd, v = rng.standard_normal(x.shape), rng.standard_normal(w.shape), rng.standard_normal(b.shape), rng.standard_normal(x.shape)
    problem, extra, wdg, bdg = prepare(x, mask, -1, weight=w, bias=b, dps=DPS, like_x={"x_dot": u, "grad_out": v},
                                       like_weight=wd, like_bias=bd, **kw)
    assert_adjoint(problem, extra, wdg, bdg, (u, wd, bd), v)


@st.composite
def layouts(draw):
    """A small x shape, reduction axes, and broadcastable mask / weight / bias shapes."""
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    dims = draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))
    shrink = lambda: tuple(s if draw(st.booleans()) else 1 for s in shape)  # noqa: E731
    return shape, tuple(dims), shrink(), shrink()[-draw(st.integers(1, len(shape))):], shrink()


@given(
    layouts(),
    st.sampled_from(["normalize", "keep", "zero"]),
    st.booleans(),
    st.integers(0, 1),
    st.sampled_from([0.0, 1e-3]),
    st.integers(0, 2**32 - 1),
)
def test_adjoint_identity_on_random_layouts(layout, masked, center, correction, eps, seed):
    shape, dims, mask_shape, w_shape, b_shape = layout
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, shape).astype(np.float64)  # small integers: equal values (degenerate groups) occur
    mask = rng.random(mask_shape) < 0.7
    w, b = rng.standard_normal(w_shape), rng.standard_normal(b_shape)
    u, v = rng.standard_normal(shape), rng.standard_normal(shape)
    wd, bd = rng.standard_normal(w_shape), rng.standard_normal(b_shape)
    problem, extra, wdg, bdg = prepare(
        x, mask, dims, correction=correction, eps=eps, center=center, weight=w, bias=b, masked=masked, dps=DPS,
        like_x={"x_dot": u, "grad_out": v}, like_weight=wd, like_bias=bd,
    )
    grads = assert_adjoint(problem, extra, wdg, bdg, (u, wd, bd), v)
    assert [g.shape for g in grads] == [shape, w_shape, b_shape]


def test_zero_upstream_at_a_nan_position_is_skipped_not_multiplied():
    # under normalize yhat at the NaN position is NaN; 0 * NaN must not reach any gradient
    mask = np.array([True, True, True, False])
    gx, gw, gb = vjp(arr(1, 0, 0, 0), arr(0, 1, 2, NAN), mask, correction=1, eps=0, weight=arr(1, 1, 1, 1), bias=arr(0, 0, 0, 0))
    np.testing.assert_array_equal(gx, [1 / 6, -1 / 3, 1 / 6, 0])
    np.testing.assert_array_equal(gw, [-1, 0, 0, 0])
    np.testing.assert_array_equal(gb, [1, 0, 0, 0])


# ---- float64 results are the rounded mp values; forward and derivatives agree on shapes ----------


def test_public_results_are_the_rounded_mp_values():
    x, mask, w, b, kw, rng = make_case(True, "normalize", seed=5)
    go = rng.standard_normal(x.shape)
    problem, extra, _, _ = prepare(x, mask, -1, weight=w, bias=b, dps=DPS, like_x={"grad_out": go}, **kw)
    with mpmath.workdps(DPS):
        mp = vjp_mp(problem, extra["grad_out"])
    for public, exact in zip(vjp(go, x, mask, weight=w, bias=b, **kw), mp):
        assert public.shape == exact.shape
        np.testing.assert_array_equal(public, np.vectorize(float, otypes=[float])(exact))
    assert masked_norm(x, mask, weight=w, bias=b, **kw).shape == x.shape


# ---- bad input specific to the derivatives -------------------------------------------------------


def test_derivative_arguments_are_checked():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"grad_out must have the shape of x \(2, 3\), got \(3,\)"):
        vjp(np.zeros(3), x)
    with pytest.raises(TypeError, match=r"grad_out must be a real floating"):
        vjp(np.zeros((2, 3), dtype=int), x)
    with pytest.raises(ValueError, match=r"x_dot must have the shape of x"):
        jvp(x, np.zeros((3, 2)))
    with pytest.raises(TypeError, match=r"x_dot must be a real floating"):
        jvp(x, np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError, match=r"weight_dot is given but weight is None"):
        jvp(x, x, weight_dot=np.zeros(3))
    with pytest.raises(ValueError, match=r"bias_dot must have the shape of bias \(3,\), got \(1, 3\)"):
        jvp(x, x, bias=np.zeros(3), bias_dot=np.zeros((1, 3)))
    with pytest.raises(TypeError, match=r"weight_dot must be a real floating"):
        jvp(x, x, weight=np.ones(3), weight_dot=np.ones(3, dtype=int))
