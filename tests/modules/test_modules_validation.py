"""Modules reject bad settings at construction, naming the argument, and a weight or bias of the wrong
shape (assigned after construction) with masknorm's message instead of torch's reshape error."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import masknorm

RUNNING = [masknorm.MaskedBatchNorm1d, masknorm.MaskedBatchNorm2d, masknorm.MaskedInstanceNorm1d,
           masknorm.MaskedInstanceNorm3d]


@pytest.mark.parametrize("eps", [-1e-5, math.inf, math.nan])
@pytest.mark.parametrize("make", [lambda eps: masknorm.MaskedLayerNorm(8, eps=eps),
                                  lambda eps: masknorm.MaskedRMSNorm(8, eps=eps),
                                  lambda eps: masknorm.MaskedGroupNorm(2, 8, eps=eps),
                                  *[lambda eps, cls=cls: cls(8, eps=eps) for cls in RUNNING]])
def test_eps_must_be_finite_and_non_negative(make, eps):
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        make(eps)


def test_eps_must_be_a_number_and_rms_allows_none():
    with pytest.raises(TypeError, match="MaskedLayerNorm: eps must be a real number, got str"):
        masknorm.MaskedLayerNorm(8, eps="1e-5")
    assert masknorm.MaskedRMSNorm(8, eps=None).eps is None
    assert masknorm.MaskedLayerNorm(8, eps=0.0).eps == 0.0


@pytest.mark.parametrize("cls", RUNNING)
@pytest.mark.parametrize("momentum, error", [(-0.1, ValueError), (1.5, ValueError), (math.nan, ValueError),
                                             ("0.1", TypeError)])
def test_momentum_must_be_in_the_unit_interval(cls, momentum, error):
    with pytest.raises(error, match=f"{cls.__name__}: momentum must be"):
        cls(4, momentum=momentum)


@pytest.mark.parametrize("cls", RUNNING)
def test_momentum_bounds_and_none_are_accepted(cls):
    for momentum in (0.0, 1.0, None):
        assert cls(4, momentum=momentum).momentum == momentum


@pytest.mark.parametrize("cls", RUNNING)
@pytest.mark.parametrize("num_features, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)])
def test_num_features_must_be_a_positive_int(cls, num_features, error):
    with pytest.raises(error, match="num_features must be a positive int"):
        cls(num_features)


@pytest.mark.parametrize("cls", [masknorm.MaskedLayerNorm, masknorm.MaskedRMSNorm])
@pytest.mark.parametrize("shape", [-2, [], [4, -1], (4, 2.5), "8"])
def test_normalized_shape_must_be_ints_of_at_least_zero(cls, shape):
    with pytest.raises(ValueError, match="normalized_shape must be an int >= 0"):
        cls(shape)


@pytest.mark.parametrize("cls", [masknorm.MaskedLayerNorm, masknorm.MaskedRMSNorm])
def test_an_empty_feature_axis_is_accepted_as_torch_accepts_it(cls):
    assert cls(0)(torch.randn(3, 0)).shape == (3, 0)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(eps="1e-5", correction=-1), TypeError, "MaskedNorm: eps must be a real number, got str"),  # the call
    (dict(eps=-1e-5), ValueError, "MaskedNorm: eps must be finite and >= 0"),
    (dict(eps=math.nan), ValueError, "MaskedNorm: eps must be finite and >= 0"),
    (dict(correction=-1), ValueError, "MaskedNorm: correction must be an int >= 0, got -1"),
    (dict(correction=1.0), TypeError, "MaskedNorm: correction must be an int >= 0, got float"),
    (dict(correction=True), TypeError, "MaskedNorm: correction must be an int >= 0, got bool"),
    (dict(center="no"), TypeError, "MaskedNorm: center must be a bool, got str"),
])
def test_einops_norm_settings_are_refused_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        masknorm.MaskedNorm("b n d", "d", d=4, **kwargs)


def test_einops_norm_accepts_what_masked_norm_accepts():
    m = masknorm.MaskedNorm("b n d", "d", d=4, eps=0, correction=np.int64(1), center=False)
    assert m(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)).shape == (2, 3, 4)


@pytest.mark.parametrize("num_groups, num_channels, message", [
    (3, 8, "num_groups=3 must divide num_channels=8"), (0, 8, "num_groups must be a positive int, got 0"),
    (2, 0, "num_channels must be a positive int, got 0"), (2.0, 8, "num_groups must be a positive int, got float")])
def test_group_norm_groups(num_groups, num_channels, message):
    with pytest.raises((ValueError, TypeError), match=message):
        masknorm.MaskedGroupNorm(num_groups, num_channels)


@pytest.mark.parametrize("module, x, name", [
    (masknorm.MaskedLayerNorm(8), torch.randn(2, 8), "weight"),
    (masknorm.MaskedLayerNorm(8), torch.randn(2, 8), "bias"),
    (masknorm.MaskedRMSNorm(8), torch.randn(2, 8), "weight"),
    (masknorm.MaskedGroupNorm(4, 16), torch.randn(2, 16, 5), "weight"),
    (masknorm.MaskedBatchNorm1d(16), torch.randn(2, 16, 5), "bias"),
    (masknorm.MaskedInstanceNorm1d(16, affine=True), torch.randn(2, 16, 5), "weight"),
])
def test_a_wrong_shaped_parameter_is_named_with_the_shapes(module, x, name):
    setattr(module, name, nn.Parameter(torch.ones(7)))
    for training in (True, False):
        module.train(training)
        with pytest.raises(ValueError, match=rf"{type(module).__name__}: {name} has shape \(7,\), expected"):
            module(x)


@pytest.mark.parametrize("make, x_shape, mask_shape", [
    (lambda: masknorm.MaskedLayerNorm(4), (2, 5, 4), (2, 5)),
    (lambda: masknorm.MaskedRMSNorm(4), (2, 5, 4), (2, 5)),
    (lambda: masknorm.MaskedGroupNorm(2, 4), (2, 4, 5), (2, 5)),
    (lambda: masknorm.MaskedBatchNorm1d(4), (2, 4, 5), (2, 5)),
    (lambda: masknorm.MaskedInstanceNorm1d(4), (2, 4, 5), (2, 5)),
    (lambda: masknorm.MaskedNorm("b t c", reduce="c", features="c", c=4), (2, 5, 4), (2, 5)),
    (lambda: masknorm.MaskedSyncBatchNorm(4), (2, 4, 5), (2, 5)),
])
def test_padding_mask_is_the_mask_in_torchs_padding_convention(make, x_shape, mask_shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64)
    valid = torch.rand(mask_shape, generator=gen) > 0.4
    valid[:, 0] = True
    module = make().double()
    assert torch.equal(module(x, padding_mask=~valid), module(x, valid))
    assert not torch.equal(module(x, padding_mask=valid), module(x, valid))
    with pytest.raises(ValueError, match="not both"):
        module(x, valid, padding_mask=~valid)
    with pytest.raises(TypeError, match=r"padding_mask must be a bool tensor \(True = padding\)"):
        module(x, padding_mask=(~valid).long())
