"""Known implementation bugs, each pinned by a minimal reproduction marked xfail(strict=True):
the test fails loudly (XPASS) once the bug is fixed, which is the cue to drop the xfail and the
matching clause of strategies.hits_known_bug."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import masknorm
import masknorm.reference as ref


@pytest.mark.xfail(
    strict=True,
    raises=RuntimeError,
    reason="padded-token fast path, every axis reduced, full-shape bias: backward raises "
    "'TokenLayerNormFunctionBackward returned an invalid gradient at index 3 - got [] but expected "
    "shape compatible with [2, 3]' (bias gradient summed over an empty axis list = all axes)",
)
def test_bias_gradient_when_every_axis_is_reduced():
    """Reducing over all axes with a bias of x's shape gives the bias gradient sum over P of the
    upstream gradient, i.e. the upstream gradient itself (one group, every position in it)."""
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 3, dtype=torch.float64)
    masknorm.masked_norm(x, None, (0, 1), bias=bias).backward(grad_out)
    assert torch.equal(bias.grad, grad_out)


@pytest.mark.xfail(
    strict=True,
    reason="padded-token fast path (torch's fused layer norm) when sigma is about one ulp of mu "
    "(kappa u ~ 1.4): masked_norm(float32 [[1e14, 1.00000008e14]]) gives [-2652710912, 0] where the "
    "reference gives [-1, 1] (error 1.9e9 u*kappa; the general path, e.g. with an all-True (1, 2) "
    "mask, gives [-2, 0], within 1 u*kappa)",
)
def test_fused_layer_norm_when_sigma_is_one_ulp():
    """A float32 layer norm whose two values are one ulp apart normalizes to within a few u*kappa
    of the reference: the output stays O(1), like the reference's [-1, 1]."""
    x = torch.tensor([[1e14, 1.00000008e14]], dtype=torch.float32)
    kappa = ref.kappa(x)
    assert kappa.max() * ref.unit_roundoff(torch.float32) > 1  # sigma really is about one ulp
    assert ref.max_error_in_ukappa(masknorm.masked_norm(x), ref.masked_norm(x), kappa) <= 8


@pytest.mark.xfail(
    strict=True,
    reason="eps = 0, 1/s beyond float32's range: masked_norm(float32 [[1e-40, 2e-40]], eps=0) with upstream "
    "gradient [[1, 1]] gives grad_x [[nan, nan]] (inf * 0) where the exact gradient is [[0, 0]]",
)
def test_gradient_when_one_over_s_overflows():
    """A constant upstream gradient has zero gradient through a centered norm, however small sigma."""
    x = torch.tensor([[1e-40, 2e-40]], dtype=torch.float32, requires_grad=True)
    masknorm.masked_norm(x, eps=0.0).backward(torch.ones(1, 2))
    assert torch.equal(x.grad, torch.zeros(1, 2))


@pytest.mark.xfail(
    strict=True,
    reason="eps = 0, 1/s beyond float32's range: the tangent of masked_norm(float32 [[1e-40]], eps=0, "
    "center=False, weight=[1]) along weight_dot = [1] (x_dot = 0) is [[nan]] where it is y_hat = [[1]]",
)
def test_weight_tangent_when_one_over_s_overflows():
    """Along a tangent in the weight only, the output moves by weight_dot * y_hat."""
    with fwAD.dual_level():
        weight = fwAD.make_dual(torch.ones(1), torch.ones(1))
        out = masknorm.masked_norm(torch.tensor([[1e-40]]), eps=0.0, center=False, weight=weight)
        assert torch.equal(fwAD.unpack_dual(out).tangent, torch.ones(1, 1))
