"""Bad input to the reference: a TypeError/ValueError naming the argument, raised before any value
is converted or evaluated."""

import numpy as np
import pytest
import torch

import masknorm.reference.problem as problem_module
from masknorm.reference import kappa, masked_norm

X = np.zeros((2, 4))


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """Any conversion of values to mpf means the call got past validation: make it fail loudly."""

    def refuse(_):
        raise AssertionError("values were converted before the arguments were validated")

    monkeypatch.setattr(problem_module, "to_mpf", refuse)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(x=np.zeros((2, 4), dtype=np.int64)), TypeError, r"x must be a real floating .* int64"),
        (dict(x=torch.zeros(2, 4, dtype=torch.complex64)), TypeError, r"x must be a real floating .*torch.complex64"),
        (dict(x="abc"), TypeError, r"x must be a real floating"),
        (dict(mask=np.ones((2, 4), dtype=np.int64)), TypeError, r"mask must be a bool .* int64"),
        (dict(mask=torch.ones(2, 4)), TypeError, r"mask must be a bool .* torch.float32"),
        (dict(weight=np.ones(4, dtype=np.int32)), TypeError, r"weight must be a real floating"),
        (dict(bias=torch.ones(4, dtype=torch.int64)), TypeError, r"bias must be a real floating"),
        (dict(mask=np.ones(3, bool)), ValueError, r"mask of shape \(3,\) does not broadcast to x of shape \(2, 4\)"),
        (dict(mask=np.ones((1, 2, 4), bool)), ValueError, r"mask of shape \(1, 2, 4\) does not broadcast"),
        (dict(weight=np.ones(3)), ValueError, r"weight of shape \(3,\) does not broadcast to x of shape \(2, 4\)"),
        (dict(bias=np.ones((3, 4))), ValueError, r"bias of shape \(3, 4\) does not broadcast"),
        (dict(x=np.float64(1.0)), ValueError, r"x must have at least one dimension"),
        (dict(dim=2), ValueError, r"dim=2 is out of range for x with 2 dimensions"),
        (dict(dim=(0, -2)), ValueError, r"names the same axis twice"),
        (dict(dim=()), ValueError, r"dim must name at least one axis"),
        (dict(dim=1.0), TypeError, r"dim must be an int or a tuple of ints"),
        (dict(correction=-1), ValueError, r"correction must be >= 0, got -1"),
        (dict(correction=1.0), TypeError, r"correction must be an int >= 0"),
        (dict(eps=-1e-5), ValueError, r"eps must be finite and >= 0"),
        (dict(eps=float("nan")), ValueError, r"eps must be finite and >= 0"),
        (dict(eps="1e-5"), TypeError, r"eps must be a real number"),
        (dict(center=1), TypeError, r"center must be a bool"),
        (dict(masked="drop"), ValueError, r"masked must be one of \('normalize', 'keep', 'zero'\), got 'drop'"),
        (dict(dps=10), ValueError, r"dps must be >= 20 .* got 10"),
        (dict(dps=50.0), TypeError, r"dps must be an int >= 20, got float"),
        (dict(dps=True), TypeError, r"dps must be an int"),
    ],
)
def test_masked_norm_rejects(kwargs, error, message):
    call = dict(x=X)
    call.update(kwargs)
    with pytest.raises(error, match=message):
        masked_norm(call.pop("x"), **call)


def test_the_guard_sees_work():
    with pytest.raises(AssertionError, match="converted before"):
        masked_norm(X)


def test_kappa_validates_the_same_way():
    with pytest.raises(TypeError, match="mask must be a bool"):
        kappa(X, np.ones((2, 4)))
    with pytest.raises(ValueError, match="dps must be >= 20"):
        kappa(X, dps=5)
