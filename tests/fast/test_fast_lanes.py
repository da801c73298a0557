"""The C++ lanes (impl/fast/kernels/lanes.cpp, native.lanes()): each runs its operator on exactly the calls
the operator takes, with the operator's bits, and returns None, having done nothing, on any other call."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from masknorm.fast import native, per_channel

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


def _batch_args():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 1], [1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    running = [torch.randn(8), torch.rand(8) + 0.5, torch.tensor(3)]
    return [x, mask, torch.randn(8), torch.randn(8), "keep", 1e-5, *running, 0.1, per_channel.KERNEL_MAX_NUMEL,
            per_channel.KERNEL_MIN_ROW]


def _rows_op(args):
    x, mask, weight, bias, ndims, eps, center, masked = args
    return torch.ops.masknorm.padded_rows_norm(x, mask, weight, bias, ndims, eps, center, masked == "zero")[0]


def _channels_op(args):
    return torch.ops.masknorm.masked_channels_norm(*args)[0]


def _batch_op(args):
    x, mask, weight, bias, masked, eps = args[:6]
    return torch.ops.masknorm.per_channel_norm(x, mask, weight, bias, 0, eps, masked)[0]


LANES = {"padded_rows": (_rows_args, _rows_op), "masked_channels": (_channels_args, _channels_op),
         "batch_channels": (_batch_args, _batch_op)}
FLOATING = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPES = {"padded_rows": FLOATING, "masked_channels": FLOATING, "batch_channels": [torch.float32, torch.float64]}


def _to(args, dtype):
    """args with x, weight, bias (and a batch lane's running statistics) in dtype."""
    floating = (0, 2, 3, 6, 7) if len(args) == 12 else (0, 2, 3)
    return [a.to(dtype) if i in floating else a for i, a in enumerate(args)]


@pytest.mark.parametrize("lane, dtype", [(lane, dtype) for lane in LANES for dtype in DTYPES[lane]], ids=str)
def test_a_lane_gives_its_operators_bits(lane, dtype):
    make, op = LANES[lane]
    args = _to(make(), dtype)
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

BATCH_ONLY = {
    "bfloat16 x": lambda a: a.__setitem__(slice(None), _to(a, torch.bfloat16)),
    "eps 0": lambda a: a.__setitem__(5, 0.0),
    "bad policy": lambda a: a.__setitem__(4, "drop"),
    "policy not a str": lambda a: a.__setitem__(4, 0),
    "mask with a channel axis": lambda a: a.__setitem__(1, a[1].unsqueeze(1)),
    "mask of another length": lambda a: a.__setitem__(1, a[1][:, :5]),
    "weight (C, 1)": lambda a: a.__setitem__(2, a[2].unsqueeze(1)),
    "bias of another size": lambda a: a.__setitem__(3, a[3][:7]),
    "running mean strided": lambda a: a.__setitem__(6, torch.randn(16)[::2]),
    "running var of another dtype": lambda a: a.__setitem__(7, a[7].double()),
    "running var None alone": lambda a: a.__setitem__(7, None),
    "running mean None alone": lambda a: a.__setitem__(6, None),
    "batches int32": lambda a: a.__setitem__(8, a[8].int()),
    "batches of two values": lambda a: a.__setitem__(8, torch.tensor([3, 3])),
    "momentum an int": lambda a: a.__setitem__(9, 1),
    "x over the kernel's size": lambda a: a.__setitem__(10, a[0].numel() - 1),
    "a negative size limit": lambda a: a.__setitem__(11, -1),
}

CHANNELS_ONLY = {
    "groups 0": lambda a: a.__setitem__(4, 0),
    "groups a float": lambda a: a.__setitem__(4, 4.0),
    "policy 3": lambda a: a.__setitem__(6, 3),
    "policy -1": lambda a: a.__setitem__(6, -1),
}


@pytest.mark.parametrize("lane, case", [(lane, case) for lane in LANES for case in DECLINED]
                         + [("padded_rows", case) for case in ROWS_ONLY]
                         + [("masked_channels", case) for case in CHANNELS_ONLY]
                         + [("batch_channels", case) for case in BATCH_ONLY])
def test_a_lane_declines_a_call_it_cannot_check(lane, case):
    args = LANES[lane][0]()
    {**DECLINED, **ROWS_ONLY, **CHANNELS_ONLY, **BATCH_ONLY}[case](args)
    before = [a.clone() for a in args[6:9] if isinstance(a, torch.Tensor) and a.device.type == "cpu"]
    assert getattr(native.lanes(), lane)(*args) is None
    after = [a for a in args[6:9] if isinstance(a, torch.Tensor) and a.device.type == "cpu"]
    assert all(torch.equal(a, b) for a, b in zip(after, before))  # a declined batch call updates nothing


@pytest.mark.parametrize("lane", LANES)
def test_a_lane_declines_under_a_dispatch_mode(lane):
    args = LANES[lane][0]()
    with Passthrough():
        assert getattr(native.lanes(), lane)(*args) is None


NODES = {"padded_rows": "PaddedRowsNormBackward", "masked_channels": "MaskedChannelsNormBackward",
         "batch_channels": "PerChannelNormBackward"}


@pytest.mark.parametrize("lane", LANES)
def test_a_lane_records_its_operators_node(lane):
    args = LANES[lane][0]()
    args[0].requires_grad_()
    y = getattr(native.lanes(), lane)(*args)
    assert y.grad_fn.name() == NODES[lane]
    y.sum().backward()
    assert args[0].grad is not None and torch.isfinite(args[0].grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_the_batch_lane_updates_the_running_statistics_as_its_operator(dtype, momentum):
    args = _to(_batch_args(), dtype)
    args[9] = momentum
    expected = [t.clone() for t in args[6:9]]
    _, mean, var, count, *_ = torch.ops.masknorm.per_channel_norm(*args[:4], 0, args[5], args[4])
    torch.ops.masknorm.per_channel_track(*expected, mean, var, count, momentum)
    versions = [t._version for t in args[6:9]]
    native.lanes().batch_channels(*args)
    for got, want, version in zip(args[6:9], expected, versions):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert got._version > version  # updated in place as the operator's ADInplaceOrView kernel marks it
    assert not torch.equal(args[6], _batch_args()[6])  # the update moved the running mean


def test_the_batch_lane_without_running_statistics_updates_nothing():
    args = _batch_args()
    args[6:10] = [None] * 4
    torch.testing.assert_close(native.lanes().batch_channels(*args), _batch_op(args), rtol=0, atol=0)


def test_a_channel_the_batch_kernel_flags_gives_none_and_updates_nothing():
    args = _batch_args()
    args[0][:, 2] *= 1e19  # a float32 variance above max/16: the kernel flags channel 2
    before = [t.clone() for t in args[6:9]]
    assert native.lanes().batch_channels(*args) is None
    assert all(torch.equal(a, b) for a, b in zip(args[6:9], before))


def test_an_operators_error_reaches_python_as_an_exception():
    args = _rows_args()
    args[2] = torch.randn(7)  # the caller checks the weight's size; the operator refuses it
    with pytest.raises(RuntimeError, match="weight must have 8 elements"):
        native.lanes().padded_rows(*args)


@pytest.mark.parametrize("lane", LANES)
def test_a_wrong_number_of_arguments_is_an_error(lane):
    with pytest.raises(RuntimeError, match="takes"):
        getattr(native.lanes(), lane)(torch.randn(2, 3))
