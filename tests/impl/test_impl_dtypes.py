"""Dtypes: float16/bfloat16 inputs return their own dtype (accumulating in float32), float32 and
float64 stay as they are; gradients and tangents have the dtype of what they differentiate."""

import pytest
import torch

import masknorm
import masknorm.reference as ref
from masknorm.fast import native
from support.strategies import DTYPES, Case, impl_jvp, impl_vjp
from support.bounds import FORWARD_BOUND

ids = lambda d: str(d).removeprefix("torch.")  # noqa: E731

# The layouts that may take different code paths: layer norm over the last axis (no mask),
# batch-norm axes with eps > 0, a masked middle axis.
LAYOUTS = [
    dict(dim=-1, mask=None, weight_shape=(5,)),
    dict(dim=(0, 2), mask=None, weight_shape=(4, 1)),
    dict(dim=(1,), mask=torch.tensor([[True], [False], [True], [True]]), weight_shape=(5,)),
]


def _case(dtype, param_dtype, layout) -> Case:
    gen = torch.Generator().manual_seed(7)
    shape = (3, 4, 5)
    return Case(
        x=torch.randn(shape, generator=gen).to(dtype),
        mask=layout["mask"],
        dim=layout["dim"],
        weight=torch.randn(layout["weight_shape"], generator=gen).to(param_dtype),
        bias=torch.randn(layout["weight_shape"], generator=gen).to(param_dtype),
    )


@pytest.mark.parametrize("layout", LAYOUTS, ids=["last-axis", "batch-axes", "masked-middle"])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("param_dtype", [None, torch.float32], ids=["same", "float32-params"])
def test_result_dtypes(layout, dtype, param_dtype):
    """out, the tangent and grad_x have x's dtype; grad_weight and grad_bias have the parameters'
    dtype (the same as x's, or float32 with half-precision x)."""
    case = _case(dtype, param_dtype or dtype, layout)
    out = case.run()
    assert out.dtype == dtype and out.shape == case.x.shape and bool(torch.isfinite(out).all())
    gx, gw, gb = impl_vjp(case, torch.ones_like(case.x))
    assert (gx.dtype, gw.dtype, gb.dtype) == (dtype, case.weight.dtype, case.bias.dtype)
    assert gw.shape == case.weight.shape and gb.shape == case.bias.shape
    assert impl_jvp(case, torch.ones_like(case.x), torch.ones_like(case.weight)).dtype == dtype


# LAYOUTS at (3, 8, 16): groups of 16, 48 and 3 * 16 * (valid rows)
HALF_LAYOUTS = [
    dict(dim=-1, mask=None, weight_shape=(16,)),
    dict(dim=(0, 2), mask=None, weight_shape=(8, 1)),
    dict(dim=(1,), mask=torch.tensor([True, False, True, True, True, False, True, True]).reshape(8, 1),
         weight_shape=(16,)),
]


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "no-kernels"])
@pytest.mark.parametrize("layout", HALF_LAYOUTS, ids=["last-axis", "batch-axes", "masked-middle"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=ids)
def test_half_precision_is_computed_in_float32(dtype, layout, kernels):
    """x near 1000 (bfloat16 spacing there 4, float16's 0.5; spread ~4) and an upstream gradient near 1
    (spread 0.1): neither the mean nor the gradient's centring sums fit the dtype. Computed in float32,
    out and grad_x are the exact results rounded once (within u of the largest; float32's own error
    is ~1e-3 u); computed in the half dtype itself they are off by tens of u, which the accuracy bounds
    in u*kappa (kappa ~ 250 here) do not tell apart."""
    gen = torch.Generator().manual_seed(11)
    x = (1000 + 4 * torch.randn(3, 8, 16, generator=gen, dtype=torch.float64)).to(dtype)
    weight = (torch.rand(layout["weight_shape"], generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.randn(layout["weight_shape"], generator=gen, dtype=torch.float64).to(dtype)
    grad = (1 + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(dtype)
    args = (layout["mask"], layout["dim"])
    with native.kernels(kernels):
        xr = x.clone().requires_grad_()
        out = masknorm.masked_norm(xr, *args, weight=weight, bias=bias)
        (grad_x,) = torch.autograd.grad(out, xr, grad)
    params = dict(weight=weight.double(), bias=bias.double())
    expected = torch.as_tensor(ref.masked_norm(x.double(), *args, **params)).double()
    expected_grad = torch.as_tensor(ref.vjp(grad.double(), x.double(), *args, **params)[0]).double()
    u = torch.finfo(dtype).eps / 2
    for got, want in ((out, expected), (grad_x, expected_grad)):
        assert ((got.double() - want).abs() <= 1.01 * u * want.abs().max()).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=ids)
def test_half_precision_sums_do_not_overflow(dtype):
    """64 values near the dtype's largest finite value (their sum and squares overflow the dtype
    itself): the output is finite and within FORWARD_BOUND u*kappa of the reference."""
    big = torch.finfo(dtype).max / 2
    x = (big * (1 - torch.linspace(0, 0.5, 64))).reshape(2, 32).to(dtype)
    out = masknorm.masked_norm(x)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    err = ref.max_error_in_ukappa(out, ref.masked_norm(x), ref.kappa(x))
    assert err <= FORWARD_BOUND[dtype], err
