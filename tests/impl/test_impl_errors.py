"""Bad arguments to masknorm.masked_norm: each raises the contract's error class with a message
naming the argument and the offending value, before any tensor operation runs."""

import re

import pytest
import torch
from torch.overrides import TorchFunctionMode

import masknorm
from masknorm.fast import native
from masknorm import _contract

X = torch.randn(2, 3)
BOOL = dict(dtype=torch.bool)

# Reading a tensor's metadata (shape, dtype, device, dim) and printing it into the message is all
# a call may do before raising.
_METADATA = {"getset_descriptor.__get__", "TensorBase.dim", "TensorBase.size", "Tensor.__repr__", "Tensor.__format__"}


class _NoTensorWork(TorchFunctionMode):
    """Fails on any torch function other than reading metadata or printing a tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__qualname__", repr(func))
        if name not in _METADATA:
            raise AssertionError(f"tensor work ({name}) before the argument error")
        return func(*args, **(kwargs or {}))


BAD_CALLS = [
    # (id, args, kwargs, error class, message fragment)
    ("x-list", ([[1.0, 2.0]],), {}, TypeError, "x must be a torch.Tensor, got list"),
    ("x-int", (torch.ones(2, 3, dtype=torch.int64),), {}, TypeError, "x must be a floating tensor (float16/bfloat16/float32/float64), got dtype torch.int64"),
    ("x-bool", (torch.ones(2, 3, **BOOL),), {}, TypeError, "got dtype torch.bool"),
    ("x-complex", (torch.ones(2, 3, dtype=torch.complex64),), {}, TypeError, "got dtype torch.complex64"),
    ("x-0d", (torch.tensor(1.0),), {}, ValueError, "x must have at least one dimension, got a 0-d tensor"),
    ("mask-float", (X, torch.ones(2, 3)), {}, TypeError, "mask must be a bool tensor (True = valid), got dtype torch.float32 of shape (2, 3)"),
    ("mask-int", (X, torch.ones(2, 3, dtype=torch.uint8)), {}, TypeError, "mask must be a bool tensor (True = valid), got dtype torch.uint8"),
    ("mask-list", (X, [[True] * 3] * 2), {}, TypeError, "mask must be a torch.Tensor or None, got list"),
    ("mask-meta", (X, torch.ones(2, 3, device="meta", **BOOL)), {}, ValueError, "mask is on meta but x is on cpu"),
    ("mask-wider", (X, torch.ones(3, 3, **BOOL)), {}, ValueError, "mask of shape (3, 3) does not broadcast to x of shape (2, 3)"),
    ("mask-more-dims", (X, torch.ones(1, 2, 3, **BOOL)), {}, ValueError, "mask of shape (1, 2, 3) does not broadcast to x of shape (2, 3)"),
    ("weight-shape", (X,), dict(weight=torch.ones(4)), ValueError, "weight of shape (4,) does not broadcast to x of shape (2, 3)"),
    ("weight-more-dims", (X,), dict(weight=torch.ones(5, 2, 3)), ValueError, "weight of shape (5, 2, 3) does not broadcast to x of shape (2, 3)"),
    ("weight-int", (X,), dict(weight=torch.ones(3, dtype=torch.int32)), TypeError, "weight must be a floating tensor, got dtype torch.int32 of shape (3,)"),
    ("weight-list", (X,), dict(weight=[1.0, 1.0, 1.0]), TypeError, "weight must be a torch.Tensor or None, got list"),
    ("bias-shape", (X,), dict(bias=torch.ones(2, 1, 3)), ValueError, "bias of shape (2, 1, 3) does not broadcast to x of shape (2, 3)"),
    ("bias-bool", (X,), dict(bias=torch.ones(3, **BOOL)), TypeError, "bias must be a floating tensor, got dtype torch.bool"),
    ("dim-out-of-range", (X, None, 2), {}, ValueError, "dim=2 is out of range for x with 2 dimensions"),
    ("dim-negative-out-of-range", (X, None, (0, -3)), {}, ValueError, "dim=(0, -3) is out of range for x with 2 dimensions"),
    ("dim-duplicated", (X, None, (1, -1)), {}, ValueError, "dim=(1, -1) names the same axis twice (x has 2 dimensions)"),
    ("dim-empty", (X, None, ()), {}, ValueError, "dim must name at least one axis to reduce, got an empty sequence"),
    ("dim-float", (X, None, 1.0), {}, TypeError, "dim must be an int or a tuple of ints, got float 1.0"),
    ("dim-str", (X, None, "1"), {}, TypeError, "dim must be an int or a tuple of ints, got str '1'"),
    ("dim-bool", (X, None, True), {}, TypeError, "dim must be an int or a tuple of ints, got bool True"),
    ("dim-none", (X, None, None), {}, TypeError, "dim must be an int or a tuple of ints, got NoneType None"),
    ("dim-element", (X, None, (0, 1.0)), {}, TypeError, "dim must be an int or a tuple of ints, got element 1.0 in dim=(0, 1.0)"),
    ("eps-negative", (X,), dict(eps=-1e-5), ValueError, "eps must be finite and >= 0, got -1e-05"),
    ("eps-nan", (X,), dict(eps=float("nan")), ValueError, "eps must be finite and >= 0, got nan"),
    ("eps-inf", (X,), dict(eps=float("inf")), ValueError, "eps must be finite and >= 0, got inf"),
    ("eps-str", (X,), dict(eps="0.1"), TypeError, "eps must be a real number >= 0, got str '0.1'"),
    ("eps-tensor", (X,), dict(eps=torch.tensor(0.1)), TypeError, "eps must be a real number >= 0, got Tensor"),
    ("correction-negative", (X,), dict(correction=-1), ValueError, "correction must be >= 0, got -1"),
    ("correction-float", (X,), dict(correction=1.0), TypeError, "correction must be an int >= 0, got float 1.0"),
    ("correction-bool", (X,), dict(correction=True), TypeError, "correction must be an int >= 0, got bool True"),
    ("center-int", (X,), dict(center=1), TypeError, "center must be a bool, got int 1"),
    ("masked-unknown", (X,), dict(masked="mean"), ValueError, "masked must be one of ('normalize', 'keep', 'zero'), got 'mean'"),
    ("masked-none", (X,), dict(masked=None), ValueError, "masked must be one of ('normalize', 'keep', 'zero'), got None"),
]


@pytest.mark.parametrize("args, kwargs, error, message", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_argument_raises_before_any_work(args, kwargs, error, message):
    """The call raises exactly `error` (not a subclass of another contract error), its message
    contains `message`, and no tensor operation other than reading metadata ran before it."""
    with pytest.raises(error, match=re.escape(message)) as info, _NoTensorWork():
        masknorm.masked_norm(*args, **kwargs)
    assert type(info.value) is error


def test_metadata_guard_detects_work():
    """The guard above is not vacuous: a valid call does tensor work inside it and is stopped."""
    with pytest.raises(AssertionError, match="tensor work"), _NoTensorWork():
        masknorm.masked_norm(X)


_TOKENS = torch.randn(2, 5, 8), torch.tensor([[True] * 5, [True, True, True, False, False]])
_LANE_CALLS = {
    "masked_norm": lambda: masknorm.masked_norm(_TOKENS[0], _TOKENS[1][..., None], -1),
    "layer": lambda: masknorm.MaskedLayerNorm(8)(*_TOKENS),
    "group": lambda: masknorm.MaskedGroupNorm(2, 8)(_TOKENS[0].transpose(1, 2), _TOKENS[1]),
    "batch": lambda: masknorm.MaskedBatchNorm1d(8)(_TOKENS[0].transpose(1, 2), _TOKENS[1]),
}


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _NoLane:
    def __getattr__(self, name):
        raise AssertionError(f"the C++ lane {name} was called under a TorchFunctionMode")


@pytest.mark.parametrize("call", _LANE_CALLS)
def test_a_call_under_a_torch_function_mode_takes_the_route(call, monkeypatch):
    """Under a TorchFunctionMode the C++ lanes are not called (their one C++ call would pass the mode by): the
    route's torch calls reach the mode, as torch's own layers' do."""
    expected = _LANE_CALLS[call]()
    monkeypatch.setattr(native, "lanes", _NoLane)
    with _PassThrough():
        torch.testing.assert_close(_LANE_CALLS[call](), expected, rtol=0, atol=0)


def _layer_norm(x, eps):
    """Layer norm over the last axis in float64, written out."""
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    return ((x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)).float()


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_argument_checks_answer_each_call_anew(cached, monkeypatch):
    """The shape checks are looked up by (shapes, dim) outside torch.compile (and computed where
    they cannot be: under compile, symbolic sizes): a call after another with other shapes, dims,
    eps or types of equal value gets its own result or error, never the earlier call's. (The
    uncached route is forced through _contract._cacheable: patching torch.compiler.is_compiling
    would leave Dynamo, imported meanwhile, unable to trace the real one later in the session.)"""
    if not cached:
        monkeypatch.setattr(_contract, "_cacheable", lambda *shapes: False)
    x2, x3 = torch.randn(2, 3), torch.randn(2, 3, 4)
    for x, eps in ((x2, 1e-5), (x3, 1e-5), (x2, 4.0), (x3, 4.0)):
        for dim in (-1, (-1,), x.dim() - 1):
            out = masknorm.masked_norm(x, None, dim, eps=eps)
            assert out.shape == x.shape and torch.allclose(out, _layer_norm(x, eps), atol=1e-6)
    masknorm.masked_norm(x3, None, 2)
    with pytest.raises(ValueError, match=re.escape("dim=2 is out of range for x with 2 dimensions")):
        masknorm.masked_norm(x2, None, 2)
    masknorm.masked_norm(x2, None, (1,))
    with pytest.raises(TypeError, match=re.escape("got element True in dim=(True,)")):
        masknorm.masked_norm(x2, None, (True,))
    masknorm.masked_norm(x2, torch.ones(2, 1, **BOOL))
    with pytest.raises(ValueError, match=re.escape("mask of shape (3, 1) does not broadcast to x of shape (2, 3)")):
        masknorm.masked_norm(x2, torch.ones(3, 1, **BOOL))
    masknorm.masked_norm(x2, correction=1)
    with pytest.raises(TypeError, match=re.escape("correction must be an int >= 0, got bool True")):
        masknorm.masked_norm(x2, correction=True)
