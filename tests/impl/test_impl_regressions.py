"""Regressions: bugs the property suite found in the implementation, each kept as its minimal
reproduction (bias gradient with every axis reduced; the fused layer norm at kappa u ~ 1; NaN
gradients and tangents where 1/s overflows with eps = 0, also with weight 0; masked-out values
whose normalized value overflows under "normalize")."""

from dataclasses import replace

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import masknorm
import masknorm.reference as ref
from support.bounds import FORWARD_BOUND, JVP_BOUND, VJP_AFFINE_BOUND, VJP_X_BOUND, forward_error, jvp_error, vjp_errors
from support.strategies import Case


def test_bias_gradient_when_every_axis_is_reduced():
    """Reducing over all axes with a bias of x's shape gives the bias gradient sum over P of the
    upstream gradient, i.e. the upstream gradient itself (one group, every position in it)."""
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 3, dtype=torch.float64)
    masknorm.masked_norm(x, None, (0, 1), bias=bias).backward(grad_out)
    assert torch.equal(bias.grad, grad_out)


def test_fused_layer_norm_when_sigma_is_one_ulp():
    """A float32 layer norm whose two values are one ulp apart normalizes to within a few u*kappa
    of the reference: the output stays O(1), like the reference's [-1, 1]."""
    x = torch.tensor([[1e14, 1.00000008e14]], dtype=torch.float32)
    kappa = ref.kappa(x)
    assert kappa.max() * ref.unit_roundoff(torch.float32) > 1  # sigma really is about one ulp
    assert ref.max_error_in_ukappa(masknorm.masked_norm(x), ref.masked_norm(x), kappa) <= 8


def test_gradient_when_one_over_s_overflows():
    """A constant upstream gradient has zero gradient through a centered norm, however small sigma."""
    x = torch.tensor([[1e-40, 2e-40]], dtype=torch.float32, requires_grad=True)
    masknorm.masked_norm(x, eps=0.0).backward(torch.ones(1, 2))
    assert torch.equal(x.grad, torch.zeros(1, 2))


def test_weight_tangent_when_one_over_s_overflows():
    """Along a tangent in the weight only, the output moves by weight_dot * y_hat."""
    with fwAD.dual_level():
        weight = fwAD.make_dual(torch.ones(1), torch.ones(1))
        out = masknorm.masked_norm(torch.tensor([[1e-40]]), eps=0.0, center=False, weight=weight)
        assert torch.equal(fwAD.unpack_dual(out).tangent, torch.ones(1, 1))


def test_tangent_with_zero_weight_when_one_over_s_overflows():
    """With weight 0 the tangent is weight_dot * y_hat, however large y_hat_dot would be: found by
    the property suite (bfloat16, eps = 0, a subnormal group, weight 0) as 0 * inf = NaN."""
    x = torch.tensor([[1e-39, 0.0]])
    with fwAD.dual_level():
        weight = fwAD.make_dual(torch.zeros(1), torch.ones(1))
        out = masknorm.masked_norm(fwAD.make_dual(x, torch.ones(1, 2)), eps=0.0, center=False, weight=weight)
        tangent = fwAD.unpack_dual(out).tangent
    expected = ref.jvp(x, torch.ones(1, 2), eps=0.0, center=False, weight=torch.zeros(1), weight_dot=torch.ones(1))
    assert bool(torch.isfinite(tangent).all())
    torch.testing.assert_close(tangent, torch.from_numpy(expected).float(), rtol=4 * 2.0**-24, atol=0)


def _far_masked_out(dtype: torch.dtype, layout: str) -> Case:
    """RMS norm, eps = 0, masked="normalize", masked-out values so far from their group that
    y_hat = (x - mu)/s is beyond the float32 range, beside weights 0 (exact output: the bias) and
    tiny ones (exact output finite). "rows-redone": one subnormal valid value (1/s beyond 2^40: the
    row kernel hands the row to the general statistics); "rows": a row the kernel normalizes itself
    (1/s = 4e11, masked-out 3e38 and -1e30); "groups": the same values as one group of two channels
    (the group kernel's layout: mask per position, weight per channel)."""
    if layout == "groups":
        x = [[[2e-12, 3e-12, 3e38, 1.0], [1e-12, -2e-12, -1e30, 5.0]]]
        mask, dim, weight, bias = [[[True, True, False, False]]], (1, 2), [[0.0], [1e-20]], [[0.5], [2.0]]
    else:
        x = [[9e-41, 1.0, 100.0, -100.0]] if layout == "rows-redone" else [[2e-12, 3e-12, 3e38, -1e30]]
        mask, dim, weight, bias = [[True, False, False, False]], -1, [1.0, 0.0, 1e-30, 0.0], [0.5, 0.25, -1.0, 2.0]
        if layout == "rows":
            mask, weight = [[True, True, False, False]], [1.0, 2.0, 0.0, 1e-20]
    as_t = lambda v: torch.tensor(v).to(dtype)  # noqa: E731
    return Case(as_t(x), torch.tensor(mask), dim, eps=0.0, center=False, weight=as_t(weight), bias=as_t(bias))


@pytest.mark.parametrize("fused_kernel", [True, False], ids=["kernels", "general"])
@pytest.mark.parametrize("layout", ["rows-redone", "rows", "groups"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_masked_out_value_whose_y_hat_overflows(dtype, layout, fused_kernel):
    """The bias where the weight is 0 (was NaN: inf * 0), a finite output where gamma y_hat is
    finite, and forward, VJP and JVP within the suite's bounds of the reference (inf only where the
    exact value overflows, never NaN), on the masked-position kernels and on the general path.
    Found by test_fast_path_layouts_within_bound (masked-rows) under the random profile."""
    case = replace(_far_masked_out(dtype, layout), fused_kernel=fused_kernel)
    expected_node = "MaskedPositionsFunctionBackward" if fused_kernel else "MaskedNormFunctionWithJvpBackward"
    assert case.run(x=case.x.clone().requires_grad_()).grad_fn.name() == expected_node
    out = case.run()
    zero_weight = (case.weight == 0).expand(out.shape)
    assert torch.equal(out[zero_weight], case.bias.expand(out.shape)[zero_weight])
    assert forward_error(case) <= FORWARD_BOUND[dtype]
    ex, ew, eb = vjp_errors(case, torch.ones_like(case.x))
    assert ex <= VJP_X_BOUND[dtype] and max(ew, eb) <= VJP_AFFINE_BOUND[dtype], (ex, ew, eb)
    ones = [torch.ones_like(t) for t in (case.x, case.weight, case.bias)]
    assert jvp_error(case, *ones) <= JVP_BOUND[dtype]


@pytest.mark.parametrize("fused_kernel", [True, False], ids=["kernels", "general"])
@pytest.mark.parametrize("layout", ["rows", "groups"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gradient_when_the_sum_of_g_y_hat_overflows(dtype, layout, fused_kernel):
    """Layer norm of 2^33, 2^34, 3 * 2^33 (mu = 2^34 exactly: y_hat = 0 in the middle) beside a
    masked-out 3e38 (y_hat ~ 4e28) with upstream gradient 1e11: sum_P g y_hat ~ 4e39 is beyond
    float32, while every exact gradient is finite (the middle one: 1/s (g - sum g / k), was
    0 * inf = NaN; the outer ones ~ 2e29, were inf)."""
    x = torch.tensor([2.0**33, 2.0**34, 3 * 2.0**33, 3e38]).to(dtype)
    shape, dim = ((1, 1, 4), (1, 2)) if layout == "groups" else ((1, 4), -1)
    case = Case(x.reshape(shape), torch.tensor([True, True, True, False]).reshape(shape), dim, eps=0.0,
                fused_kernel=fused_kernel)
    expected_node = "MaskedPositionsFunctionBackward" if fused_kernel else "MaskedNormFunctionWithJvpBackward"
    assert case.run(x=case.x.clone().requires_grad_()).grad_fn.name() == expected_node
    grad_out = torch.tensor([1.0, 1.0, 1.0, 1e11]).to(dtype).reshape(shape)
    ex, _, _ = vjp_errors(case, grad_out)
    assert ex <= VJP_X_BOUND[dtype]


@pytest.mark.parametrize("weight", [0.0, 1e-20])
def test_batch_norm_gradient_when_a_masked_out_y_hat_overflows(weight):
    """The batch-norm layout (its own fast path, eps > 0): a masked-out 3e38 beside valid values
    near 1e-3 has y_hat ~ 1e41; with weight 0 every exact gradient of x is 0 (was NaN), with 1e-20
    they are finite (were -inf and NaN); the weight's gradient, ~6e38, is beyond float32 (inf)."""
    x = torch.tensor([[[1e-3, 3e38]], [[2e-3, -1.0]]])
    mask = torch.tensor([[[True, False]], [[True, True]]])
    case = Case(x, mask, (0, 2), weight=torch.tensor([weight]), bias=torch.tensor([0.5]))
    assert case.run(x=x.clone().requires_grad_()).grad_fn.name() == "PerChannelFunctionBackward"
    assert forward_error(case) <= FORWARD_BOUND[torch.float32]
    ex, ew, eb = vjp_errors(case, torch.ones_like(x))
    assert ex <= VJP_X_BOUND[torch.float32] and max(ew, eb) <= VJP_AFFINE_BOUND[torch.float32], (ex, ew, eb)
    assert jvp_error(case, torch.ones_like(x), torch.ones(1), torch.ones(1)) <= JVP_BOUND[torch.float32]


def test_the_overflow_repair_under_torch_func_matches_eager():
    """Under torch.func the float64 repair runs unconditionally (no data-dependent check): the same
    outputs as eager, where it runs because a result was not finite, and finite gradients."""
    case = _far_masked_out(torch.float32, "rows-redone")

    def run(x):
        return masknorm.masked_norm(x, case.mask, case.dim, **case.kwargs)

    torch.testing.assert_close(torch.func.vmap(run)(case.x[None])[0], run(case.x), rtol=0, atol=0)
    grad = torch.func.grad(lambda x: run(x).sum())(case.x)
    x = case.x.clone().requires_grad_()
    run(x).sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=0, atol=0)
    assert not bool(grad.isnan().any())
