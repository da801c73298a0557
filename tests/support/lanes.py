"""What the modules' lanes to the fused kernels (fast.padded_rows.eager_call, fast.channel_lane.eager_call)
are tested against alike: calls the general route rejects, which a lane must reject the same way, before
any work."""

import contextlib
import math
import warnings
from typing import Callable, Iterator, Sequence

import pytest
import torch

BAD_CALLS = ["int mask", "mask of another shape", "mask on another device", "int x", "x of another width",
             "negative eps", "infinite eps", "bad policy", "weight of another shape", "weight on another device"]


def spoil(case: str, module: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, narrow: Callable) -> tuple:
    """(module, x, mask) with one thing the route rejects, named by `case` (one of BAD_CALLS);
    narrow(x) is x with fewer features than the module's."""
    width = module.weight.numel()
    if case == "int mask":
        mask = mask.int()
    elif case == "mask of another shape":
        mask = mask[:, :5]
    elif case == "mask on another device":
        mask = mask.to("meta")
    elif case == "int x":
        x = x.int()
    elif case == "x of another width":
        x = narrow(x)
    elif case == "negative eps":
        module.eps = -1.0
    elif case == "infinite eps":
        module.eps = math.inf
    elif case == "bad policy":
        module.masked = "drop"
    elif case == "weight of another shape":
        module.weight = torch.nn.Parameter(torch.ones(width - 1))
    elif case == "weight on another device":
        module.weight = torch.nn.Parameter(torch.ones(width, device="meta"))
    return module, x, mask


def _no_work(*args, **kwargs):
    raise AssertionError("the kernel ran on a call that must be rejected")


@contextlib.contextmanager
def failing_operators(names: Sequence[str]) -> Iterator[None]:
    """masknorm's operators `names` with CPU kernels that fail if run, however they are called (the C++ lanes
    call them through the dispatcher): torch.library registrations over the built ones, undone on exit."""
    with warnings.catch_warnings(), torch.library._scoped_library("masknorm", "IMPL") as library:
        warnings.filterwarnings("ignore", r"(?s).*Overriding a previously registered kernel")
        for name in names:
            library.impl(name, _no_work, "CPU")
        yield


def assert_rejected_before_work(monkeypatch, call: Callable[[], object], lane_off: Sequence[tuple],
                                kernels: Sequence[tuple], operators: Sequence[str]) -> None:
    """call() raises the TypeError/ValueError, with the message, that it raises with the lane off (the
    (object, name, value) patches of lane_off), while every (object, name) in `kernels` and every masknorm
    operator in `operators` fails if run."""
    with monkeypatch.context() as patch:
        for obj, name, value in lane_off:
            patch.setattr(obj, name, value)
        with pytest.raises((TypeError, ValueError)) as routed:
            call()

    with monkeypatch.context() as patch, failing_operators(operators):
        for obj, name in kernels:
            patch.setattr(obj, name, _no_work)
        with pytest.raises(routed.type) as got:
            call()
    assert str(got.value) == str(routed.value)
