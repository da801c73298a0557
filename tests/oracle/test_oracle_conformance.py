"""Correct implementations conform: torch's own layer/RMS/group/batch norms (no mask) and
masknorm.masked_norm for every family and policy, forward and gradients, against the oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import masknorm
from support.norms import layer_norm
from masknorm.reference.oracle.frameworks import Framework
from masknorm.reference.oracle.properties import Caller, measure_forward, measure_gradient
from masknorm.testing import FORWARD_BOUND, GRADIENT_BOUND, MaskedInput, Semantics, assert_conforms

EXAMPLES = 8


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """F.rms_norm over the last axis, eps given (its default depends on the dtype)."""
    return F.rms_norm(x, x.shape[-1:], eps=1e-5)


def group_norm(x: torch.Tensor) -> torch.Tensor:
    """F.group_norm with G groups on x of shape (N, G, C/G, L), as (N, C, L): reduces axes (2, 3)."""
    n, groups, per_group, length = x.shape
    return F.group_norm(x.reshape(n, groups * per_group, length), groups, eps=1e-5).reshape(x.shape)


def batch_norm(x: torch.Tensor) -> torch.Tensor:
    """F.batch_norm in training mode, no running statistics, on (N, C, L): reduces axes (0, 2)."""
    return F.batch_norm(x, None, None, training=True, eps=1e-5)


TORCH_NORMS = [
    (layer_norm, Semantics(-1), dict()),
    (rms_norm, Semantics(-1, center=False), dict()),
    (group_norm, Semantics((2, 3)), dict(ndim=4, min_group_size=2)),
    (batch_norm, Semantics((0, 2)), dict(ndim=3, min_group_size=2)),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("fn, semantics, shape", TORCH_NORMS, ids=lambda v: getattr(v, "__name__", ""))
def test_torch_norms_conform(fn, semantics, shape, dtype):
    report = assert_conforms(fn, semantics, mask=False, grad=True, dtype=dtype, examples=EXAMPLES, **shape)
    statuses = {p.name: p.status for p in report.properties}
    assert statuses["padding garbage"] == "skipped" and statuses["gradient vs reference"] == "pass"


# family -> (semantics options, rank, axes the mask varies along)
FAMILIES = {
    "layer": (dict(dim=-1), 3, (0, 1)),
    "rms": (dict(dim=-1, center=False), 3, (0, 1)),
    "batch": (dict(dim=(0, 2)), 3, (0, 2)),
    "batch-unbiased": (dict(dim=(0, 2), correction=1), 3, None),
    "group": (dict(dim=(2, 3)), 4, (0, 3)),
    "instance": (dict(dim=2), 3, (0, 2)),
}


def masknorm_as(semantics: Semantics):
    """masknorm.masked_norm configured as `semantics`, called as fn(x, mask)."""

    def fn(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masknorm.masked_norm(x, mask, semantics.dim, **semantics.options)

    return fn


@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_masknorm_conforms(family, masked):
    options, rank, mask_dims = FAMILIES[family]
    semantics = Semantics(masked=masked, **options)
    dtype = "float32" if family in ("rms", "group") else "float64"
    report = assert_conforms(
        masknorm_as(semantics), semantics, ndim=rank, mask_dims=mask_dims, grad=True, dtype=dtype, examples=EXAMPLES
    )
    assert all(p.status == "pass" for p in report.properties)


def test_masknorm_batch_path_gradient_with_huge_padding():
    """Regression (found by this oracle): the batch-norm fast path gave a NaN gradient where padding
    holds 1.8e308 and the upstream gradient is 0."""
    semantics = Semantics((0, 2), correction=1)
    x = torch.tensor([[[0.0, 0.1, 0.0, torch.finfo(torch.float64).max]]], dtype=torch.float64)
    mask = torch.tensor([[[True, True, True, False]]])
    grad_out = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    outcome = measure_gradient(Caller(masknorm_as(semantics), Framework()), semantics, MaskedInput(x, mask, (0, 2)), grad_out)
    assert outcome.problem is None and outcome.error <= GRADIENT_BOUND


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_masknorm_conforms_in_half_precision(dtype):
    semantics = Semantics(-1)
    assert_conforms(masknorm_as(semantics), semantics, mask_dims=(0,), grad=True, dtype=dtype, examples=EXAMPLES)


def test_masknorm_conforms_at_overflow_and_underflow_thresholds():
    semantics = Semantics(-1, eps=0.0)
    assert_conforms(masknorm_as(semantics), semantics, dtype="float32", extreme=True, examples=EXAMPLES)


def test_masknorm_overflowing_padding_output_rounds_to_inf():
    """Regression (found by this oracle): a padded output whose true value overflows float32 must be
    -inf (correctly rounded), not the saturated -3.4e38 an earlier clamp gave."""
    semantics = Semantics(-1)
    x = torch.tensor([[4.2535293329816107e37, 0.0]], dtype=torch.float32)
    mask = torch.tensor([[True, False]])
    outcome = measure_forward(Caller(masknorm_as(semantics), Framework()), semantics, MaskedInput(x, mask, (1,)))
    assert outcome.problem is None and outcome.error <= FORWARD_BOUND
