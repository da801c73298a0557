"""masked_norm over the last axis with one mask flag per token ((*x.shape[:-1], 1), as layer norm is called by
hand) takes the layer modules' lane into the padded-rows kernel (functional._token_lane -> fast.padded_rows
.eager_call) before its own checks and routing. That lane must give the route's bits (outputs and gradients),
leave every other call to the route, and raise what the route raises, before any work."""

from unittest import mock

import pytest
import torch
from support.lanes import assert_rejected_before_work, failing_operators

from masknorm import functional, masked_norm
from masknorm.fast import native, padded_rows

pytestmark = pytest.mark.skipif(native.ops() is None, reason="the fused CPU kernels could not be built")


def _same_bits(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _inputs(dtype, B=3, T=7, D=24):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=gen).to(dtype)
    x[0, -2:] = float("nan")  # garbage in the padding
    mask = torch.ones(B, T, 1, dtype=torch.bool)
    mask[0, -2:] = False
    mask[2, 3] = False
    weight, bias = (torch.randn(D, generator=gen).to(dtype) for _ in range(2))
    return x, mask, weight, bias


def _call(x, mask, weight, bias, dim, center, masked, lane: bool):
    """(output, grad x, grad weight, grad bias) of one recorded masked_norm call, with its lane on or off, and
    whether the lane answered."""
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    took, eager_call = [], padded_rows.eager_call

    def spy(*args):
        took.append(eager_call(*args))
        return took[-1]

    with mock.patch.object(padded_rows, "eager_call", spy if lane else (lambda *args: None)):
        out = masked_norm(leaves[0], mask, dim, weight=leaves[1], bias=leaves[2], center=center, masked=masked)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return (out.detach(), *grads), bool(took) and took[-1] is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("dim", [-1, (-1,), [2], 2], ids=["-1", "(-1,)", "[2]", "2"])
def test_the_lane_gives_the_routes_bits(dtype, masked, center, dim):
    x, mask, weight, bias = _inputs(dtype)
    if masked == "normalize":
        x = torch.nan_to_num(x)  # garbage at a normalized position is that position's own output
    lane, took = _call(x, mask, weight, bias, dim, center, masked, lane=True)
    route, _ = _call(x, mask, weight, bias, dim, center, masked, lane=False)
    assert took
    for a, b in zip(lane, route):
        _same_bits(a, b)


def test_the_lane_without_a_mask_gives_the_routes_bits():
    x, _, weight, bias = _inputs(torch.float32)
    x = torch.nan_to_num(x)
    lane, took = _call(x, None, weight, bias, -1, True, "normalize", lane=True)
    route, _ = _call(x, None, weight, bias, -1, True, "normalize", lane=False)
    assert took
    for a, b in zip(lane, route):
        _same_bits(a, b)


DECLINED = {
    "another axis": lambda c: c.update(dim=1, mask=c["mask"].transpose(1, 2)),
    "two axes": lambda c: c.update(dim=(1, 2)),
    "an elementwise mask": lambda c: c.update(mask=c["mask"].expand(c["x"].shape).clone()),
    "a broadcast mask": lambda c: c.update(mask=c["mask"][:1]),
    "a mask without the last axis": lambda c: c.update(mask=c["mask"][..., 0]),
    "correction 1": lambda c: c.update(correction=1),
    "weight (1, 1, D)": lambda c: c.update(weight=c["weight"].reshape(1, 1, -1)),
    "backend triton": lambda c: c.update(backend="triton"),
    "x of rank 1": lambda c: c.update(x=c["x"][0, 0], mask=None),
}


@pytest.mark.parametrize("case", DECLINED)
def test_a_call_the_lane_does_not_take_goes_to_the_route(case):
    x, mask, weight, bias = _inputs(torch.float32)
    call = {"x": torch.nan_to_num(x), "mask": mask, "dim": -1, "weight": weight, "bias": bias, "correction": 0,
            "backend": "auto"}
    DECLINED[case](call)
    assert functional._token_lane(call["x"], call["mask"], call["dim"], call["correction"], 1e-5, True,
                                  call["weight"], call["bias"], "normalize", call["backend"]) is None


def test_the_lane_runs_the_operator_that_the_bad_call_test_makes_fail():
    """The bad-call test below would see the lane's work: with padded_rows_norm failing, a good call fails."""
    x, mask, weight, bias = _inputs(torch.float32)
    with failing_operators(["padded_rows_norm"]), pytest.raises(AssertionError, match="the kernel ran"):
        masked_norm(x, mask, -1, weight=weight, bias=bias)


BAD_CALLS = {
    "int mask": dict(mask=lambda m: m.int()),
    "mask on meta": dict(mask=lambda m: m.to("meta")),
    "negative eps": dict(eps=-1.0),
    "infinite eps": dict(eps=float("inf")),
    "bad policy": dict(masked="drop"),
    "weight of another shape": dict(weight=lambda w: w[:-1]),
    "bias on meta": dict(bias=lambda b: b.to("meta")),
    "bad backend": dict(backend="cuda"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_calls_raise_what_the_route_raises_before_any_work(case, monkeypatch):
    x, mask, weight, bias = _inputs(torch.float32)
    call = {"mask": mask, "weight": weight, "bias": bias, "eps": 1e-5, "masked": "normalize", "backend": "auto"}
    for name, change in BAD_CALLS[case].items():
        call[name] = change(call[name]) if callable(change) else change
    assert_rejected_before_work(
        monkeypatch, lambda: masked_norm(x, call["mask"], -1, weight=call["weight"], bias=call["bias"],
                                         eps=call["eps"], masked=call["masked"], backend=call["backend"]),
        lane_off=[(functional, "_token_lane", lambda *args: None)],  # the route before the lane
        kernels=[(padded_rows, "one_call"), (padded_rows.PaddedRowsFunction, "apply")],
        operators=["padded_rows_norm", "rows_norm"])
