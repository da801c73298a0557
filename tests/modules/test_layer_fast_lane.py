"""MaskedLayerNorm and MaskedRMSNorm call the fused kernel straight from the module where it takes
the call (fast.padded_rows.eager_call): eager mode on CPU data, mask None or one flag per token.
That lane must give the bits of masked_norm's general route (outputs and gradients), leave every
other call to that route, and raise what the route raises, before any work."""

from unittest import mock

import pytest
import torch

from masknorm import functional, masked_norm
from masknorm.fast import native, padded_rows
from masknorm.modules import MaskedLayerNorm, MaskedRMSNorm
from masknorm.modules import layer
from support.lanes import BAD_CALLS, assert_rejected_before_work, failing_operators, spoil

pytestmark = pytest.mark.skipif(native.ops() is None, reason="the fused CPU kernels could not be built")


def _same_bits(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _routed(*args, **kwargs):
    """masked_norm(*args, **kwargs) through its route: its own lane into the same kernel (functional._token_lane)
    off, so that the lanes are compared with the route, not with each other."""
    with mock.patch.object(functional, "_token_lane", lambda *lane_args: None):
        return masked_norm(*args, **kwargs)


def _general(module, x, mask):
    """The module's call through masked_norm (the route every call took before the lane)."""
    center = isinstance(module, MaskedLayerNorm)
    eps = (torch.finfo(x.dtype).eps if module.eps is None else module.eps)
    return _routed(x, None if mask is None else mask[..., None], -1, eps=eps, center=center,
                   weight=module.weight, bias=getattr(module, "bias", None) if center else None,
                   masked=module.masked)


def _inputs(dtype, with_mask, B=3, T=7, D=24):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=gen).to(dtype)
    if not with_mask:
        return x, None
    x[0, -2:] = float("nan")  # garbage in the padding
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -2:] = False
    mask[2, 3] = False
    return x, mask


def _module(cls, D, dtype, affine, masked):
    module = cls(D, elementwise_affine=affine, masked=masked).to(dtype)
    if affine:
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
    return module


@pytest.mark.parametrize("cls", [MaskedLayerNorm, MaskedRMSNorm], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_the_lane_gives_the_general_routes_bits_without_grad(cls, dtype, masked, with_mask, affine, monkeypatch):
    module = _module(cls, 24, dtype, affine, masked)
    x, mask = _inputs(dtype, with_mask)
    with torch.no_grad():
        expected = _general(module, x, mask)
        with monkeypatch.context() as patch:
            patch.setattr(layer, "masked_norm", None)  # the lane takes the call: masked_norm is not reached
            got = module(x, mask)
    _same_bits(got, expected)


@pytest.mark.parametrize("cls", [MaskedLayerNorm, MaskedRMSNorm], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("masked", ["normalize", "zero"])
def test_the_lane_gives_the_general_routes_gradients(cls, dtype, masked, monkeypatch):
    module = _module(cls, 24, dtype, True, masked)
    x, mask = _inputs(dtype, True)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads = []
    for lane in (False, True):
        xr = x.clone().requires_grad_()
        module.zero_grad()
        with monkeypatch.context() as patch:
            if lane:
                patch.setattr(layer, "masked_norm", None)
            out = module(xr, mask) if lane else _general(module, xr, mask)
        out.backward(dy)
        grads.append([out.detach(), xr.grad, *(p.grad for p in module.parameters())])
    for got, expected in zip(grads[1], grads[0]):
        _same_bits(got, expected)


def test_a_row_the_kernel_flags_leaves_the_lane_for_the_general_route():
    """kappa = |mu|/sigma far above 1/(4u) (mean 1e6, spread 1e-3 in float32): the kernel flags the
    row, the lane gives the call back, and the general route redoes it."""
    module = MaskedLayerNorm(16)
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    x[1, 2] = 1e6 + 1e-3 * x[1, 2]
    mask = torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        assert padded_rows.eager_call(x, mask, 1, 1e-5, True, module.weight, module.bias, "normalize") is None
        _same_bits(module(x, mask), _general(module, x, mask))


@pytest.mark.parametrize("case", ["broadcast token mask", "elementwise mask", "weight of another dtype", "int eps",
                                  "padding_mask", "forward AD"])
def test_calls_the_lane_does_not_take_give_the_general_routes_bits(case):
    module = MaskedLayerNorm(24)
    x, mask = _inputs(torch.float32, True)
    x = torch.nan_to_num(x)
    expected_mask = mask
    if case == "broadcast token mask":
        mask = expected_mask = mask[:1]
    elif case == "elementwise mask":
        mask = expected_mask = mask[..., None].expand(x.shape).clone()
        mask[1, 1, :5] = False
    elif case == "weight of another dtype":
        module.weight = torch.nn.Parameter(module.weight.detach().double())
    elif case == "int eps":
        module.eps = 0
    with torch.no_grad():
        if case == "padding_mask":
            got = module(x, padding_mask=~mask)
        elif case == "forward AD":
            import torch.autograd.forward_ad as fwAD
            with fwAD.dual_level():
                got = fwAD.unpack_dual(module(fwAD.make_dual(x, torch.ones_like(x)), mask)).primal
        else:
            got = module(x, mask)
        general = _routed(x, expected_mask[..., None] if expected_mask.dim() < x.dim() else expected_mask, -1,
                          eps=float(module.eps), weight=module.weight, bias=module.bias, masked=module.masked)
    _same_bits(got, general)


def test_the_lane_runs_the_operator_that_the_bad_call_test_makes_fail():
    """The bad-call test below would see the lane's work: with padded_rows_norm failing, a good call fails."""
    x, mask = _inputs(torch.float32, True)
    with failing_operators(["padded_rows_norm"]), pytest.raises(AssertionError, match="the kernel ran"):
        MaskedLayerNorm(24)(x, mask)


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_calls_raise_what_the_general_route_raises_before_any_work(case, monkeypatch):
    x, mask = _inputs(torch.float32, True)
    module, x, mask = spoil(case, MaskedLayerNorm(24), x, mask, lambda t: t[..., :20])
    assert_rejected_before_work(
        monkeypatch, lambda: module(x, mask),
        lane_off=[(padded_rows, "eager_call", lambda *args: None)],  # the module's route before the lane
        kernels=[(padded_rows, "one_call"), (padded_rows.PaddedRowsFunction, "apply")],
        operators=["padded_rows_norm", "rows_norm"])


@pytest.mark.parametrize("cls", [MaskedLayerNorm, MaskedRMSNorm], ids=["layer", "rms"])
@pytest.mark.parametrize("masked", ["normalize", "zero"])
def test_the_lanes_double_backward_with_a_token_mask_passes_gradgradcheck(cls, masked):
    """The lane's node saves the token mask (B, T); its double backward (the general closed form) reads it at x's
    rank. It raised a broadcasting error before (the mask (B, T) against x (B, T, D))."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [False] * 4])
    module = _module(cls, 6, torch.float64, True, masked)
    assert "PaddedRowsNorm" in module(x, mask).grad_fn.name()
    assert torch.autograd.gradgradcheck(lambda x: module(x, mask), (x,))
