"""masknorm.masked_norm against the mpmath reference: forward, VJP (x, weight, bias) and JVP in
float64, float32, bfloat16 and float16, errors in units of u * kappa (masknorm.reference.error).

The error measures and their bounds (about twice the worst measured): support/bounds.py.
"""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import masknorm
import masknorm.reference as ref
from support.bounds import (
    FORWARD_BOUND, JVP_BOUND, VJP_AFFINE_BOUND, VJP_X_BOUND, as_numpy, assert_wide_token_rows_within_bound, draw_tangents,
    forward_error, grad_x_error,
    jvp_error, vjp_errors,
)
from support.strategies import (
    DIM_SETS,
    DTYPES,
    EPS_VALUES,
    POLICIES,
    Case,
    cases,
    channels,
    impl_vjp,
    like,
    masked_rows,
    padded_tokens,
    padded_tokens_on_torch_kernels,
    thorough,
)


dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


@dtypes
@given(data=st.data())
def test_forward_within_bound(dtype, data):
    """The output is within FORWARD_BOUND[dtype] u kappa of the reference at every position
    (pass-through and zeroed positions exactly), and keeps x's dtype."""
    case = data.draw(cases(dtype))
    err = forward_error(case)
    assert err <= FORWARD_BOUND[dtype], f"forward error {err:.3g} u*kappa > {FORWARD_BOUND[dtype]}"


@pytest.mark.theorem("closed_form_derivatives")
@dtypes
@given(data=st.data())
def test_vjp_within_bound(dtype, data):
    """grad_x, grad_weight and grad_bias from torch.autograd are within their bounds of the
    reference's VJP, and have the dtypes and shapes of x, weight and bias."""
    case = data.draw(cases(dtype))
    ex, ew, eb = vjp_errors(case, like(data.draw, case.x))
    assert ex <= VJP_X_BOUND[dtype], f"grad_x error {ex:.3g} > {VJP_X_BOUND[dtype]}"
    assert max(ew, eb) <= VJP_AFFINE_BOUND[dtype], f"grad_weight/bias errors {ew:.3g}/{eb:.3g} > {VJP_AFFINE_BOUND[dtype]}"


@pytest.mark.theorem("closed_form_derivatives")
@dtypes
@given(data=st.data())
def test_jvp_within_bound(dtype, data):
    """The forward-mode tangent (torch.autograd.forward_ad, with weight and bias tangents) is within
    JVP_BOUND[dtype] of the reference's JVP, in x's dtype."""
    case = data.draw(cases(dtype))
    err = jvp_error(case, *draw_tangents(data, case))
    assert err <= JVP_BOUND[dtype], f"jvp error {err:.3g} > {JVP_BOUND[dtype]}"


@pytest.mark.parametrize("layout", [padded_tokens, padded_tokens_on_torch_kernels, masked_rows, channels],
                         ids=["padded-tokens", "padded-tokens-torch-kernels", "masked-rows", "channels"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@given(data=st.data())
def test_fast_path_layouts_within_bound(layout, dtype, data):
    """The layouts eager fast paths may take (layer or RMS norm over trailing axes with one mask flag
    per token; batch norm over every axis but the channels), which cases() reaches only now and
    then, meet the same forward, VJP and JVP bounds as the general one. float16/bfloat16 padded
    tokens run on the fused kernel, computed in float32."""
    case = data.draw(layout(dtype))
    assert forward_error(case) <= FORWARD_BOUND[dtype]
    ex, ew, eb = vjp_errors(case, like(data.draw, case.x))
    assert ex <= VJP_X_BOUND[dtype] and max(ew, eb) <= VJP_AFFINE_BOUND[dtype], (ex, ew, eb)
    assert jvp_error(case, *draw_tangents(data, case)) <= JVP_BOUND[dtype]


@pytest.mark.parametrize("fused_kernel", [True, False], ids=["fused-kernel", "torch-kernels"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_wide_token_rows_within_bound(dtype, fused_kernel):
    """Rows of 1500 features (the fused kernel sums in blocks of 256; the strategies' rows are
    short), offset 1e3 (kappa ~ 1e3), a third of the tokens padded: forward and VJP within bound."""
    assert_wide_token_rows_within_bound(dtype, fused_kernel=fused_kernel)


@given(data=st.data())
def test_vmap_equals_loop(data):
    """torch.func.vmap over a new leading axis (x batched with the mask shared; x and a full mask
    batched together) agrees slice by slice with calling masked_norm per slice, within twice the
    float64 forward bound (both are within the bound of the reference; eager calls may take a
    fast path that vmap does not)."""
    base = data.draw(cases(torch.float64))
    xs = torch.stack([base.x, like(data.draw, base.x, -3.0, 3.0)])
    masks = torch.stack([base.full_mask, ~base.full_mask])

    def one(x, mask):
        return masknorm.masked_norm(x, mask, base.dim, **base.kwargs)

    shared = torch.func.vmap(one, in_dims=(0, None))(xs, base.mask)
    both = torch.func.vmap(one)(xs, masks)
    bound = 2 * FORWARD_BOUND[torch.float64]
    for i in range(2):
        for batched, mask in ((shared, base.mask), (both, masks[i])):
            case = replace(base, x=xs[i], mask=mask)
            err = ref.max_error_in_ukappa(batched[i], as_numpy(case.run()), case.kappa(), weight=case.weight, bias=case.bias)
            assert err <= bound, f"vmap vs loop: {err:.3g} u*kappa > {bound}"


@given(data=st.data())
def test_vmap_of_grad_equals_loop(data):
    """Per-sample gradients: vmap(grad(<c, out>)) agrees with the gradient computed sample by sample
    (torch.autograd) within twice the float64 grad_x bound."""
    base = data.draw(cases(torch.float64))
    xs = torch.stack([base.x, like(data.draw, base.x, -3.0, 3.0)])
    cs = torch.stack([like(data.draw, base.x), like(data.draw, base.x)])

    def loss(x, c):
        return (masknorm.masked_norm(x, base.mask, base.dim, **base.kwargs) * c).sum()

    batched = torch.func.vmap(torch.func.grad(loss))(xs, cs)
    for i in range(2):
        case = replace(base, x=xs[i])
        expected = impl_vjp(case, cs[i])[0]
        err = grad_x_error(case, cs[i], batched[i], as_numpy(expected))
        assert err <= 2 * VJP_X_BOUND[torch.float64], f"vmap(grad) vs loop: {err:.3g}"


@thorough
@pytest.mark.parametrize("dim", DIM_SETS, ids=str)
@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("eps", EPS_VALUES)
@pytest.mark.parametrize("center", [True, False], ids=["center", "rms"])
@pytest.mark.parametrize("masked", POLICIES)
@dtypes
@settings(max_examples=10)
@given(data=st.data())
def test_every_combination_within_bounds(dim, correction, eps, center, masked, dtype, data):
    """Every combination of reduction axes, correction, eps, center and policy, in every dtype
    (which the examples drawn by the tests above cover only at random) meets the forward, VJP and
    JVP bounds."""
    case = data.draw(cases(dtype, policies=(masked,), eps_values=(eps,), centers=(center,), corrections=(correction,),
                           dim_sets=(dim,)))
    assert forward_error(case) <= FORWARD_BOUND[dtype]
    ex, ew, eb = vjp_errors(case, like(data.draw, case.x))
    assert ex <= VJP_X_BOUND[dtype] and max(ew, eb) <= VJP_AFFINE_BOUND[dtype], (ex, ew, eb)
    assert jvp_error(case, *draw_tangents(data, case)) <= JVP_BOUND[dtype]


SPECIAL_MASK = torch.tensor([[False] * 5, [False, False, True, False, False], [True, True, False, True, True], [True, False, True, True, True]])
SPECIAL_X = torch.tensor([
    [3.0, -1.0, 0.5, 2.0, 7.0],  # every position masked out
    [1.0, 4.0, -2.5, 0.25, -3.0],  # a single valid position
    [1.5, 1.5, 9.0, 1.5, 1.5],  # valid values all equal, a different masked-out one
    [1000.25, 999.0, 1000.5, 999.75, 1001.0],  # kappa ~ 1e3
], dtype=torch.float64)


@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("eps", EPS_VALUES)
@pytest.mark.parametrize("center", [True, False], ids=["center", "rms"])
@pytest.mark.parametrize("masked", POLICIES)
@dtypes
def test_special_groups_within_bounds(correction, eps, center, masked, dtype):
    """An all-masked group, a single valid position, a constant group with a masked-out outlier and
    a group with kappa ~ 1e3 side by side, with weight and bias, in every combination of options:
    forward, VJP and JVP within their bounds (whatever the drawn examples above happen to cover)."""
    gen = torch.Generator().manual_seed(3)
    case = Case(x=SPECIAL_X.to(dtype), mask=SPECIAL_MASK, dim=-1, correction=correction, eps=eps, center=center,
                masked=masked, weight=(1 + torch.rand(5, generator=gen)).to(dtype), bias=torch.randn(5, generator=gen).to(dtype))
    grad_out, x_dot = (torch.randn(4, 5, generator=gen).to(dtype) for _ in range(2))
    assert forward_error(case) <= FORWARD_BOUND[dtype]
    ex, ew, eb = vjp_errors(case, grad_out)
    assert ex <= VJP_X_BOUND[dtype] and max(ew, eb) <= VJP_AFFINE_BOUND[dtype], (ex, ew, eb)
    assert jvp_error(case, x_dot, torch.ones(5, dtype=dtype), torch.ones(5, dtype=dtype)) <= JVP_BOUND[dtype]
