"""Sizes hypothesis never draws: channels of 10^7 and more valid values with a large mean, many small
groups. The reference here is float64 torch (two passes over the valid values): its error, about
1e-16 kappa, is nothing against float32's u = 6e-8, so float32 results are judged in u*kappa against
it with the suite's float32 bounds (test_impl_accuracy.py). CI runs 10^7 per channel; the thorough
profile 4 * 10^7."""


import pytest
import torch

import masknorm
from support.strategies import thorough
from support.bounds import FORWARD_BOUND, VJP_X_BOUND

U32 = 2.0**-24


def _batch_norm_float64(x, mask, g, eps=1e-5):
    """(y, grad x, kappa, s) of batch norm over (0, 2) of the valid values, in float64."""
    xd, gd, md = x.double(), g.double(), mask.expand_as(x)
    k = md.sum((0, 2), keepdim=True)
    mu = torch.where(md, xd, 0).sum((0, 2), keepdim=True) / k
    var = torch.where(md, (xd - mu) ** 2, 0).sum((0, 2), keepdim=True) / k
    s = (var + eps).sqrt()
    y = (xd - mu) / s
    sum_g, sum_gy = gd.sum((0, 2), keepdim=True), (gd * y).sum((0, 2), keepdim=True)
    gx = (gd - md * (sum_g + y * sum_gy) / k) / s
    return y, gx, (mu.abs() + var.sqrt()) / s, s


def _check_long_channels(length: int, mean: float):
    gen = torch.Generator().manual_seed(length % 1000)
    x = (torch.randn(1, 2, length, generator=gen, dtype=torch.float64) + mean).float().requires_grad_()
    mask = torch.rand(1, 1, length, generator=gen) > 0.3
    g = torch.randn(1, 2, length, generator=gen)
    y = masknorm.masked_norm(x, mask, (0, 2))
    (gx,) = torch.autograd.grad(y, x, g)
    y64, gx64, kappa, s = _batch_norm_float64(x.detach(), mask, g)
    valid = mask.expand_as(x)
    forward = ((y.double() - y64).abs() / (U32 * kappa))[valid].max().item()
    assert forward <= FORWARD_BOUND[torch.float32], f"forward {forward:.3g} u*kappa"
    # grad x, normwise per channel: |gx - gx*| <= C u kappa max|g| / s
    backward = ((gx.double() - gx64).abs() / (U32 * kappa * g.abs().amax((0, 2), keepdim=True) / s)).max().item()
    assert backward <= VJP_X_BOUND[torch.float32], f"grad x {backward:.3g} u*kappa max|g|/s"


@pytest.mark.parametrize("mean", [1e3, 1e4])
def test_ten_million_valid_values_per_channel_with_a_large_mean(mean):
    """Once, 4 * 10^6 values near 1000 gave valid outputs of mean 0.88 and std 0.47 (float32 matrix-product sums)."""
    _check_long_channels(10_000_000, mean)


@thorough
def test_forty_million_values_per_channel():
    _check_long_channels(40_000_000, 1e4)


def test_a_million_small_groups():
    """Layer norm over 10^6 groups of 4 values, a quarter of the tokens padded with NaN: valid
    groups normalized exactly as one group alone, padded ones passed through."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1000, 1000, 4, generator=gen) * 100 + 50
    mask = torch.rand(1000, 1000, 1, generator=gen) > 0.25
    x = torch.where(mask, x, float("nan"))
    y = masknorm.masked_norm(x, mask, -1)
    xd = x.double()
    mu, var = xd.mean(-1, keepdim=True), xd.var(-1, correction=0, keepdim=True)
    s = (var + 1e-5).sqrt()
    kappa = ((mu.abs() + var.sqrt()) / s).expand_as(x)
    valid = mask.expand_as(x)
    assert torch.equal(y[~valid].isnan(), x[~valid].isnan())
    error = ((y.double() - (xd - mu) / s).abs() / (U32 * kappa))[valid].max().item()
    assert error <= FORWARD_BOUND[torch.float32], f"{error:.3g} u*kappa"
