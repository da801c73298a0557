"""Derivatives of masknorm.masked_norm through torch's machinery, in float64: gradcheck (reverse
and forward AD), gradgradcheck, forward-over-reverse against finite differences of the reference
VJP, the adjoint identity between torch.func.jvp and torch.func.vjp, torch.func.vmap against a
torch.compile(fullgraph=True) against eager. (torch.func.vmap against a Python loop is in
test_impl_accuracy.py: it is judged by the accuracy bounds.)"""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import masknorm.reference as ref
from support.strategies import POLICIES, Case, Scales, cases, like

_GEN = torch.Generator().manual_seed(20261121)


def _randn(*shape) -> torch.Tensor:
    return torch.randn(*shape, generator=_GEN, dtype=torch.float64)


def _mask(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# Well-conditioned layouts (eps > 0 or groups of distinct values), each with masked-out positions,
# an all-masked group (passed through) and, but for the padded tokens, a group with a single valid
# position; between them they reach every code path (general, batch-norm channels, padded tokens).
LAYOUTS = {
    "last-axis-full-mask": dict(
        x=_randn(2, 3, 4), dim=-1, weight=_randn(4), bias=_randn(4),
        mask=_mask([[1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]], [[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 0]]),
    ),
    "batch-axes-BL-mask": dict(
        x=_randn(3, 2, 4), dim=(0, 2), weight=_randn(2, 1), bias=_randn(2, 1), correction=1,
        mask=_mask([[1, 0, 1, 1]], [[0, 1, 1, 0]], [[1, 1, 0, 1]]).reshape(3, 1, 4),
    ),
    "middle-axis-lower-rank-mask": dict(
        x=_randn(2, 4, 3), dim=(1,), bias=_randn(3),
        mask=_mask([1, 0, 0], [1, 0, 1], [0, 0, 1], [1, 0, 1]),
    ),
    "padded-tokens": dict(
        x=_randn(2, 3, 4), dim=-1, weight=_randn(4), bias=_randn(4),
        mask=_mask([1, 1, 0], [1, 0, 0]).reshape(2, 3, 1),
    ),
    "all-axes-BT-mask": dict(
        x=_randn(2, 3, 2), dim=(0, 1, 2), weight=_randn(3, 2), eps=0.0,
        mask=_mask([1, 0, 1], [1, 1, 0]).reshape(2, 3, 1),
    ),
}


def layout_case(name: str, masked: str, center: bool) -> Case:
    return Case(**dict(LAYOUTS[name]), masked=masked, center=center)


def _function(case: Case):
    """(f, inputs): f(x[, weight][, bias]) = masked_norm with the case's other arguments."""
    names = [n for n in ("x", "weight", "bias") if getattr(case, n) is not None]

    def f(*args):
        return case.run(**dict(zip(names, args)))

    return f, tuple(getattr(case, n).detach().clone().requires_grad_() for n in names)


layouts = pytest.mark.parametrize("name", list(LAYOUTS))
policies = pytest.mark.parametrize("masked", POLICIES)
centers = pytest.mark.parametrize("center", [True, False], ids=["center", "rms"])


@pytest.mark.theorem("closed_form_derivatives")
@layouts
@policies
@centers
def test_gradcheck_reverse_and_forward(name, masked, center):
    """The backward and the forward-mode jvp both match finite differences (x, weight, bias)."""
    f, inputs = _function(layout_case(name, masked, center))
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_backward_ad=True)


@layouts
@policies
@centers
def test_gradgradcheck(name, masked, center):
    """The backward is itself differentiable, and its derivative matches finite differences."""
    f, inputs = _function(layout_case(name, masked, center))
    assert torch.autograd.gradgradcheck(f, inputs)


@layouts
@policies
@centers
def test_forward_over_reverse_matches_reference(name, masked, center):
    """torch.func.jvp of torch.func.grad (a Hessian-vector product of <c, out>) equals the
    derivative of the reference's VJP along the same direction, by Richardson-extrapolated central
    differences (h = 1e-4 and 5e-5: truncation O(h^4)), within 1e-9 of the largest entry."""
    case = layout_case(name, masked, center)
    gen = torch.Generator().manual_seed(1)
    c, v = (torch.randn(case.x.shape, generator=gen, dtype=torch.float64) for _ in range(2))

    def loss(x):
        return (case.run(x=x) * c).sum()

    _, hvp = torch.func.jvp(torch.func.grad(loss), (case.x,), (v,))

    def difference(h):
        def ref_grad(x):
            return ref.vjp(c, x, case.mask, case.dim, **case.kwargs)[0]

        return (ref_grad(case.x + h * v) - ref_grad(case.x - h * v)) / (2 * h)

    expected = (4 * difference(5e-5) - difference(1e-4)) / 3
    # measured: max |hvp - expected| / max |expected| = 1.0e-11 over every layout, policy, center
    # and seeds 0..3 of c and v
    np.testing.assert_allclose(hvp.numpy(), expected, rtol=0, atol=1e-9 * np.abs(expected).max())


# |<v, J u> - <J^T v, u>| <= ADJOINT_BOUND u E, E = sum |v| S_jvp(u) + sum |u| S_vjp(v) over x, weight
# and bias (strategies.Scales: the first-order error of each computed component) + sum |v J u| +
# sum |J^T v u| (the dot products' own rounding). Measured worst: 0.95 over 5600 random examples
# of the test's strategy (2026-11-21).
ADJOINT_BOUND = 2.0


@pytest.mark.theorem("adjointness")
@given(data=st.data())
def test_adjoint_identity(data):
    """<v, J u> = <J^T v, u> for torch.func.jvp and torch.func.vjp over (x, weight, bias), within
    ADJOINT_BOUND units of their rounding errors."""
    case = data.draw(cases(torch.float64))
    f, inputs = _function(case)
    inputs = tuple(t.detach() for t in inputs)
    u = tuple(like(data.draw, t) for t in inputs)
    v = like(data.draw, case.x)
    _, ju = torch.func.jvp(f, inputs, u)
    _, vjp_fn = torch.func.vjp(f, *inputs)
    jtv = vjp_fn(v)
    lhs = (v * ju).sum()
    rhs = sum((a * b).sum() for a, b in zip(jtv, u))
    assert torch.isfinite(lhs) and torch.isfinite(rhs)
    tangents = dict(zip([n for n in ("x", "weight", "bias") if getattr(case, n) is not None], u))
    scales = Scales(case)
    error = (v.abs() * scales.jvp(tangents["x"], tangents.get("weight"), tangents.get("bias"))).sum()
    error = error + (tangents["x"].abs() * scales.grad_x(v)).sum()
    for name, with_y_hat in (("weight", True), ("bias", False)):
        if name in tangents:
            error = error + (tangents[name].abs() * scales.grad_affine(v, tangents[name].shape, with_y_hat)).sum()
    error = error + (v * ju).abs().sum() + sum((a * b).abs().sum() for a, b in zip(jtv, u))
    assert abs(lhs - rhs) <= ADJOINT_BOUND * 2.0**-53 * error, (lhs.item(), rhs.item())


# torch.compile is slow (seconds per graph): two cases only, forward and backward, one through
# inductor (generated C++ kernels) and one through aot_eager (the traced graph run by eager ops).
@pytest.mark.parametrize(
    "name, masked, center, backend",
    [("last-axis-full-mask", "normalize", True, "aot_eager"), ("batch-axes-BL-mask", "zero", False, "inductor")],
)
def test_compile_fullgraph_equals_eager(name, masked, center, backend, tmp_path, monkeypatch):
    """torch.compile(fullgraph=True) traces masked_norm without graph breaks, and its output and
    gradients equal eager mode's within 4 float64 ulps (the compiler may reassociate sums)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # no races with other processes' caches
    torch._dynamo.reset()
    case = layout_case(name, masked, center)
    f, inputs = _function(case)
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    c = torch.randn(case.x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eager_out = f(*inputs)
    eager_grads = torch.autograd.grad((eager_out * c).sum(), inputs)
    out = compiled(*inputs)
    grads = torch.autograd.grad((out * c).sum(), inputs)
    tol = dict(rtol=4 * 2.0**-52, atol=4 * 2.0**-52)
    torch.testing.assert_close(out, eager_out, **tol)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, **tol)
