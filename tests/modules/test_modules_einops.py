"""MaskedNorm over einops-style axes: the presets it is documented to equal, per-head parameters,
composite axes, both mask conventions, and errors that name the axis."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from masknorm.modules import MaskedBatchNorm1d, MaskedGroupNorm, MaskedLayerNorm, MaskedNorm
from masknorm.reference import masked_norm as reference

F64 = {"dtype": torch.float64}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randomize(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, **F64))
    return module


def test_layer_norm_preset_equals_torch_layer_norm_with_gradients():
    gen = _gen(0)
    m = _randomize(MaskedNorm("b n d", "d", d=6, **F64), gen)
    x, g = torch.randn(2, 3, 6, generator=gen, **F64), torch.randn(2, 3, 6, generator=gen, **F64)
    assert m.weight.shape == (6,) and m.bias.shape == (6,)
    ours = torch.autograd.grad(m(x.requires_grad_()), [x, m.weight, m.bias], g)
    x2 = x.detach().requires_grad_()
    theirs = torch.autograd.grad(F.layer_norm(x2, (6,), m.weight, m.bias), [x2, m.weight, m.bias], g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_per_head_statistics_and_parameters():
    gen = _gen(1)
    m = _randomize(MaskedNorm("b h n d", "d", "h d", h=3, d=4, **F64), gen)
    x, tokens = torch.randn(2, 3, 5, 4, generator=gen, **F64), torch.rand(2, 5, generator=gen) > 0.4
    assert m.weight.shape == (3, 4)
    out = m(x, tokens)
    for h in range(3):
        normed = F.layer_norm(x[:, h], (4,), m.weight[h], m.bias[h])
        torch.testing.assert_close(out[:, h], torch.where(tokens[..., None], normed, x[:, h]))


def test_feature_order_sets_parameter_layout():
    gen = _gen(2)
    hd = _randomize(MaskedNorm("b h n d", "d", "h d", h=3, d=4, **F64), gen)
    dh = MaskedNorm("b h n d", "d", "d h", h=3, d=4, **F64)
    assert dh.weight.shape == (4, 3)
    with torch.no_grad():
        dh.weight.copy_(hd.weight.T)
        dh.bias.copy_(hd.bias.T)
    x = torch.randn(2, 3, 5, 4, generator=gen, **F64)
    torch.testing.assert_close(dh(x), hd(x))


def test_batch_norm_preset_equals_masked_batch_norm_without_running_stats():
    gen = _gen(3)
    m = _randomize(MaskedNorm("b c t", "b t", "c", c=3, **F64), gen)
    bn = MaskedBatchNorm1d(3, track_running_stats=False, **F64)
    bn.load_state_dict(m.state_dict())
    x, mask = torch.randn(4, 3, 7, generator=gen, **F64), torch.rand(4, 7, generator=gen) > 0.3
    torch.testing.assert_close(m(x, mask), bn(x, mask))
    torch.testing.assert_close(m(x), F.batch_norm(x, None, None, m.weight, m.bias, training=True))


def test_composite_axis_group_norm_equals_masked_group_norm():
    gen = _gen(4)
    m = _randomize(MaskedNorm("b (g c) t", "c t", "g c", g=2, c=3, **F64), gen)
    gn = MaskedGroupNorm(2, 6, **F64)
    with torch.no_grad():
        gn.weight.copy_(m.weight.reshape(6))
        gn.bias.copy_(m.bias.reshape(6))
    x, mask = torch.randn(3, 6, 5, generator=gen, **F64), torch.rand(3, 5, generator=gen) > 0.3
    torch.testing.assert_close(m(x, mask), gn(x, mask))
    torch.testing.assert_close(m(x), F.group_norm(x, 2, gn.weight, gn.bias))


def test_inferred_composite_size_and_ellipsis():
    gen = _gen(5)
    m = MaskedNorm("... (g c)", "c", g=2, affine=False, **F64)
    x = torch.randn(2, 3, 8, generator=gen, **F64)
    expected = F.layer_norm(x.reshape(2, 3, 2, 4), (4,)).reshape(2, 3, 8)
    torch.testing.assert_close(m(x), expected)
    tokens = torch.rand(2, 3, 2, generator=gen) > 0.5
    full = tokens[..., None].expand(2, 3, 2, 4).reshape(2, 3, 8)
    torch.testing.assert_close(m(x, tokens), torch.where(full, expected, x))


@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
def test_both_mask_conventions_match_reference(masked):
    gen = _gen(6)
    m = _randomize(MaskedNorm("b (h c) n", "c n", "h", h=2, correction=1, eps=1e-3, masked=masked, **F64), gen)
    x = torch.randn(3, 6, 5, generator=gen, **F64)
    axes_mask = torch.rand(3, 3, 5, generator=gen) > 0.3  # axes not in features: b, c, n
    x_mask = axes_mask[:, None].expand(3, 2, 3, 5).reshape(3, 6, 5)
    expected = reference(x.reshape(3, 2, 3, 5).numpy(), axes_mask[:, None].numpy(), dim=(2, 3), correction=1, eps=1e-3,
                         weight=m.weight.detach().reshape(2, 1, 1).numpy(), bias=m.bias.detach().reshape(2, 1, 1).numpy(),
                         masked=masked).reshape(3, 6, 5)
    for mask in (axes_mask, x_mask):
        np.testing.assert_allclose(m(x, mask).detach().numpy(), expected, rtol=1e-12, atol=1e-12)


def test_rms_preset_without_centering():
    gen = _gen(7)
    m = MaskedNorm("b n d", "d", center=False, bias=False, d=5, **F64)
    assert m.bias is None
    x = torch.randn(2, 3, 5, generator=gen, **F64)
    torch.testing.assert_close(m(x), F.rms_norm(x, (5,), m.weight, eps=1e-5))


def test_state_dict_repr_and_reset():
    m = MaskedNorm("b h n d", "d", "h d", h=2, d=3, masked="keep")
    assert list(m.state_dict()) == ["weight", "bias"]
    assert repr(m) == ("MaskedNorm('b h n d', reduce='d', features='h d', h=2, d=3, eps=1e-05, correction=0, "
                       "center=True, affine=True, bias=True, masked='keep')")
    with torch.no_grad():
        m.weight.fill_(3)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(2, 3))
    assert list(MaskedNorm("b d", "d", affine=False).state_dict()) == []


@pytest.mark.parametrize("args, kwargs, message", [
    (("b n d", "e"), {"d": 4}, "reduce='e': axis 'e' is not an axis of pattern 'b n d'"),
    (("b n d", "d", "n d"), {"d": 4}, "feature axis 'n' has no size: pass n=..."),
    (("b n d", ""), {}, "reduce='' names no axis"),
    (("b n d", "d"), {"d": 4, "q": 2}, "'q' is not an axis of pattern"),
    (("b (n d", "d"), {"d": 4}, "is never closed"),
    (("b n d", "d"), {"d": 4, "masked": "drop"}, "masked must be one of"),
])
def test_constructor_errors_name_the_axis(args, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[").replace(".", r"\.")):
        MaskedNorm(*args, **kwargs)


def test_forward_errors_name_axis_size_and_shapes():
    m = MaskedNorm("b n d", "d", d=4)
    with pytest.raises(ValueError, match="axis d has size d=4 = 4 but x has size 5 at dimension 2"):
        m(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 2\) .* x of shape \(2, 3, 4\): expected the axes not in features \(b n\) = \(2, 3\)"):
        m(torch.randn(2, 3, 4), torch.ones(3, 2, dtype=torch.bool))


def test_matches_masked_layer_norm_under_every_policy():
    gen = _gen(8)
    x, tokens = torch.randn(2, 4, 6, generator=gen, **F64), torch.rand(2, 4, generator=gen) > 0.5
    for masked in ("normalize", "keep", "zero"):
        torch.testing.assert_close(MaskedNorm("b n d", "d", d=6, masked=masked, **F64)(x, tokens),
                                   MaskedLayerNorm(6, masked=masked, **F64)(x, tokens))
