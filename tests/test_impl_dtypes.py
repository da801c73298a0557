"""Dtypes: float16/bfloat16 inputs return their own dtype (accumulating in float32), float32 and
float64 stay as they are; gradients and tangents have the dtype of what they differentiate."""

import pytest
import torch

import masknorm
import masknorm.reference as ref
from strategies import DTYPES, Case, impl_jvp, impl_vjp
from test_impl_accuracy import FORWARD_BOUND

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
