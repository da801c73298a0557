"""The C++ lanes (impl/fast/kernels/lanes.cpp, native.lanes()): each runs its operator on exactly the calls
the operator takes, with the operator's bits, and returns None, having done nothing, on any other call."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from masknorm.fast import native

pytestmark = pytest.mark.skipif(native.lanes() is None, reason="the fused CPU kernels could not be built")


class Tagged(torch.Tensor):
    """A subclass with torch's default __torch_function__: the route's calls honour it, the lanes cannot."""


class Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _rows_args():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], dtype=torch.bool)
    return [x, mask, torch.randn(8), torch.randn(8), 1, 1e-5, True, "normalize"]


def _channels_args():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 1], [1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    return [x, mask, torch.randn(8), torch.randn(8), 4, 1e-5, 0]


def _rows_op(args):
    x, mask, weight, bias, ndims, eps, center, masked = args
    return torch.ops.masknorm.padded_rows_norm(x, mask, weight, bias, ndims, eps, center, masked == "zero")[0]


def _channels_op(args):
    return torch.ops.masknorm.masked_channels_norm(*args)[0]


LANES = {"padded_rows": (_rows_args, _rows_op), "masked_channels": (_channels_args, _channels_op)}


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_a_lane_gives_its_operators_bits(lane, dtype):
    make, op = LANES[lane]
    args = make()
    args[0], args[2], args[3] = (t.to(dtype) for t in (args[0], args[2], args[3]))
    got = getattr(native.lanes(), lane)(*args)
    assert type(got) is torch.Tensor
    torch.testing.assert_close(got, op(args), rtol=0, atol=0)


@pytest.mark.parametrize("lane", LANES)
def test_inference_mode_tensors_take_the_lane(lane):
    make, op = LANES[lane]
    with torch.inference_mode():
        args = make()
        got = getattr(native.lanes(), lane)(*args)
        torch.testing.assert_close(got, op(args), rtol=0, atol=0)


DECLINED = {
    "x a subclass": lambda a: a.__setitem__(0, a[0].as_subclass(Tagged)),
    "mask a subclass": lambda a: a.__setitem__(1, a[1].as_subclass(Tagged)),
    "weight a subclass": lambda a: a.__setitem__(2, a[2].as_subclass(Tagged)),
    "meta x": lambda a: a.__setitem__(0, a[0].to("meta")),
    "sparse x": lambda a: a.__setitem__(0, a[0].to_sparse()),
    "int x": lambda a: a.__setitem__(0, a[0].int()),
    "empty x": lambda a: a.__setitem__(0, a[0][:0]),
    "int mask": lambda a: a.__setitem__(1, a[1].int()),
    "weight of another dtype": lambda a: a.__setitem__(2, a[2].double()),
    "bias on meta": lambda a: a.__setitem__(3, a[3].to("meta")),
    "int eps": lambda a: a.__setitem__(5, 0),
    "negative eps": lambda a: a.__setitem__(5, -1e-5),
    "nan eps": lambda a: a.__setitem__(5, math.nan),
    "infinite eps": lambda a: a.__setitem__(5, math.inf),
}
ROWS_ONLY = {
    "mask of another shape": lambda a: a.__setitem__(1, a[1][:1]),
    "ndims 0": lambda a: a.__setitem__(4, 0),
    "ndims beyond x": lambda a: a.__setitem__(4, 4),
    "ndims beyond int64": lambda a: a.__setitem__(4, 2**70),
    "bad policy": lambda a: a.__setitem__(7, "drop"),
    "center not a bool": lambda a: a.__setitem__(6, 1),
}

CHANNELS_ONLY = {
    "groups 0": lambda a: a.__setitem__(4, 0),
    "groups a float": lambda a: a.__setitem__(4, 4.0),
    "policy 3": lambda a: a.__setitem__(6, 3),
    "policy -1": lambda a: a.__setitem__(6, -1),
}


@pytest.mark.parametrize("lane, case", [(lane, case) for lane in LANES for case in DECLINED]
                         + [("padded_rows", case) for case in ROWS_ONLY]
                         + [("masked_channels", case) for case in CHANNELS_ONLY])
def test_a_lane_declines_a_call_it_cannot_check(lane, case):
    args = LANES[lane][0]()
    {**DECLINED, **ROWS_ONLY, **CHANNELS_ONLY}[case](args)
    assert getattr(native.lanes(), lane)(*args) is None


@pytest.mark.parametrize("lane", LANES)
def test_a_lane_declines_under_a_dispatch_mode(lane):
    args = LANES[lane][0]()
    with Passthrough():
        assert getattr(native.lanes(), lane)(*args) is None


def test_the_group_lane_records_the_operators_node():
    args = _channels_args()
    args[0].requires_grad_()
    y = native.lanes().masked_channels(*args)
    assert y.grad_fn.name() == "MaskedChannelsNormBackward"
    y.sum().backward()
    assert args[0].grad is not None and torch.isfinite(args[0].grad).all()


def test_the_layer_lane_records_the_operators_node():
    args = _rows_args()
    args[0].requires_grad_()
    y = native.lanes().padded_rows(*args)
    assert type(y.grad_fn).__name__ == "CppFunction"
    y.sum().backward()
    assert args[0].grad is not None and torch.isfinite(args[0].grad).all()


def test_an_operators_error_reaches_python_as_an_exception():
    args = _rows_args()
    args[2] = torch.randn(7)  # the caller checks the weight's size; the operator refuses it
    with pytest.raises(RuntimeError, match="weight must have 8 elements"):
        native.lanes().padded_rows(*args)


@pytest.mark.parametrize("lane", LANES)
def test_a_wrong_number_of_arguments_is_an_error(lane):
    with pytest.raises(RuntimeError, match="takes"):
        getattr(native.lanes(), lane)(torch.randn(2, 3))
