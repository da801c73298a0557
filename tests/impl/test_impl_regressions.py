"""Regressions: bugs the property suite found in the implementation, each kept as its minimal
reproduction (bias gradient with every axis reduced; the fused layer norm at kappa u ~ 1; NaN
gradients and tangents where 1/s overflows with eps = 0, also with weight 0)."""

import torch
import torch.autograd.forward_ad as fwAD

import masknorm
import masknorm.reference as ref


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
