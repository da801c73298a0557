"""masknorm.reference's WeightNorm: hand values, the zero-row rule, pruned entries never read, its
VJP/JVP against mpmath's numerical differentiation of a definition written out here, bad input."""

import mpmath
import numpy as np
import pytest

from masknorm.reference import weight_norm, weight_norm_jvp, weight_norm_vjp

NAN, INF = float("nan"), float("inf")


def w_of(v, g, m, p):
    """w_p = g m_p v_p / sqrt(sum m v^2), at mpmath's precision (the definition, not the reference)."""
    return g * m[p] * v[p] / mpmath.sqrt(mpmath.fsum(mq * vq**2 for mq, vq in zip(m, v)))


def test_hand_values_rows_and_dims():
    v = np.array([[3.0, 4.0], [0.0, -2.0]])
    assert weight_norm(v, np.array([2.0, 1.0])).tolist() == [[1.2, 1.6], [0.0, -1.0]]
    assert weight_norm(v, np.array([[1.0], [1.0]])).tolist() == [[0.6, 0.8], [0.0, -1.0]]  # torch's g shape
    by_column = weight_norm(v, np.array([1.0, 1.0]), dim=1)
    assert by_column.tolist() == [[1.0, 4.0 / np.sqrt(20.0)], [0.0, -2.0 / np.sqrt(20.0)]]
    whole = weight_norm(v, np.array(1.0), dim=None)
    assert np.allclose(whole, v / np.sqrt(29.0), rtol=1e-16, atol=0)


def test_extreme_rows_are_exact():
    big = np.array([[3e300, 4e300]])
    tiny = np.array([[3e-320, 4e-320]])  # subnormal: squares underflow in float64
    assert weight_norm(big, np.array([1.0])).tolist() == [[0.6, 0.8]]
    assert weight_norm(tiny, np.array([1.0])).tolist() == [[0.6, 0.8]]


def test_zero_rows_and_pruned_entries():
    v = np.array([[0.0, 0.0, 5.0], [NAN, 3.0, 4.0]])
    mask = np.array([[True, True, False], [False, True, True]])
    g = np.array([2.0, 1.0])
    assert weight_norm(v, g, mask).tolist() == [[0.0, 0.0, 0.0], [0.0, 0.6, 0.8]]
    grad_w = np.array([[1.0, 1.0, 1.0], [INF, 1.0, 0.0]])
    grad_v, grad_g = weight_norm_vjp(grad_w, v, g, mask)
    assert grad_v[0].tolist() == [0.0, 0.0, 0.0] and grad_g[0] == 0.0
    assert grad_v[1, 0] == 0.0 and np.isfinite(grad_v).all() and grad_g[1] == 0.6
    assert weight_norm_jvp(v, g, np.ones((2, 3)), np.ones(2), mask)[0].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("seed", range(3))
def test_vjp_and_jvp_equal_numerical_derivatives_of_the_definition(seed):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(5) * 10.0 ** rng.integers(-3, 4)
    mask = rng.random(5) > 0.3
    mask[0] = True
    g, grad_w, v_dot, g_dot = rng.standard_normal(), rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal()
    grad_v, grad_g = weight_norm_vjp(grad_w[None], v[None], np.array([g]), mask[None])
    w_dot = weight_norm_jvp(v[None], np.array([g]), v_dot[None], np.array([g_dot]), mask[None])
    with mpmath.workdps(40):
        vm, m = [mpmath.mpf(float(a)) for a in v], [int(b) for b in mask]

        def loss(*args):
            return mpmath.fsum(gw * w_of(args[:5], args[5], m, p) for p, gw in enumerate(grad_w))

        point = vm + [mpmath.mpf(g)]
        for j in range(6):
            direction = [0] * 6
            direction[j] = 1
            numeric = float(mpmath.diff(loss, point, tuple(direction)))
            got = grad_g[0] if j == 5 else grad_v[0, j]
            assert got == pytest.approx(numeric, rel=1e-14, abs=1e-300)
        for p in range(5):
            numeric = float(mpmath.diff(lambda t: w_of([a + t * float(d) for a, d in zip(vm, v_dot)],
                                                         g + t * g_dot, m, p), 0))
            assert w_dot[0, p] == pytest.approx(numeric, rel=1e-14, abs=1e-300)


@pytest.mark.parametrize("call, error, words", [
    (lambda: weight_norm(np.ones((2, 3)), np.ones(3)), ValueError, "g must have 2"),
    (lambda: weight_norm(np.ones((2, 3)), np.ones((1, 2))), ValueError, "g must have 2"),
    (lambda: weight_norm(np.ones((2, 3)), np.ones(2), dim=2), ValueError, "dim must be in"),
    (lambda: weight_norm(np.ones((2, 3)), np.ones(2), dim=0.0), TypeError, "dim must be an int"),
    (lambda: weight_norm(np.ones((2, 3), int), np.ones(2)), TypeError, "v must be a real floating"),
    (lambda: weight_norm(np.ones((2, 3)), np.ones(2), np.ones((2, 3))), TypeError, "mask must be a bool"),
    (lambda: weight_norm(np.ones((2, 3)), np.ones(2), np.ones((3, 3), bool)), ValueError, "does not broadcast"),
    (lambda: weight_norm(np.ones(()), np.ones(())), ValueError, "at least one dimension"),
    (lambda: weight_norm_vjp(np.ones(3), np.ones((2, 3)), np.ones(2)), ValueError, "grad_w must have v's shape"),
])
def test_bad_input_is_refused_naming_the_argument(call, error, words):
    with pytest.raises(error, match=words):
        call()
