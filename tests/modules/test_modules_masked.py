"""Masked modules against independent computations: the valid values selected explicitly with boolean
indexing (statistics, running statistics), torch's own layers on the valid tokens, and the mpmath
reference (masknorm.reference.masked_norm) for outputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from masknorm.modules import (
    MaskedBatchNorm1d, MaskedBatchNorm2d, MaskedGroupNorm, MaskedInstanceNorm1d, MaskedInstanceNorm2d,
    MaskedLayerNorm, MaskedRMSNorm,
)
from masknorm.reference import masked_norm as reference
from masknorm.reference import vjp as reference_vjp

F64 = {"dtype": torch.float64}
POLICIES = ("normalize", "keep", "zero")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _affine_module(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, **F64))
    return module


def _mask(shape, gen, p=0.6):
    """A random mask with at least two valid positions in every row of its last axis."""
    m = torch.rand(shape, generator=gen) < p
    m[..., :2] = True
    return m


def _policy(out, x, valid, masked):
    if masked == "normalize":
        return out
    return torch.where(valid, out, x if masked == "keep" else torch.zeros_like(x))


def _grads(fn, x, params, g):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    return (out, *torch.autograd.grad(out, [x, *params], g))


def _assert_all_close(ours, expected):
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


# ---- batch norm: per-channel statistics of the valid positions, selected explicitly ----------------------

def _batch_expected(x, mask, weight, bias, eps, masked):
    """gamma (x - mean)/sqrt(var + eps) + beta with mean/var (biased) of x's valid positions per channel."""
    valid_rows = x.movedim(1, -1)[mask]  # (k, C)
    mean, var = valid_rows.mean(0), valid_rows.var(0, correction=0)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps) * weight.reshape(shape) + bias.reshape(shape)
    return _policy(out, x, mask.unsqueeze(1), masked)


@pytest.mark.parametrize("masked", POLICIES)
@pytest.mark.parametrize("cls, x_shape, mask_shape", [
    (MaskedBatchNorm1d, (4, 3, 6), (4, 6)), (MaskedBatchNorm1d, (7, 3), (7,)), (MaskedBatchNorm2d, (2, 3, 4, 5), (2, 4, 5)),
])
def test_batch_norm_outputs_gradients_running_stats(cls, x_shape, mask_shape, masked):
    gen = _gen(1)
    m = _affine_module(cls(3, momentum=0.25, masked=masked, **F64), gen)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    for step in range(3):
        x = torch.randn(x_shape, generator=gen, **F64) * 2 + step
        mask = _mask(mask_shape, gen)
        g = torch.randn(x_shape, generator=gen, **F64)
        expected = _grads(lambda t: _batch_expected(t, mask, m.weight, m.bias, m.eps, masked), x, [m.weight, m.bias], g)
        _assert_all_close(_grads(lambda t: m(t, mask), x, [m.weight, m.bias], g), expected)
        valid_rows = x.movedim(1, -1)[mask]
        rm = 0.75 * rm + 0.25 * valid_rows.mean(0)
        rv = 0.75 * rv + 0.25 * valid_rows.var(0)  # unbiased: divisor k - 1
        torch.testing.assert_close(m.running_mean, rm)
        torch.testing.assert_close(m.running_var, rv)
    assert m.num_batches_tracked.item() == 3


def test_batch_norm_cumulative_average_with_masks():
    gen = _gen(2)
    m = MaskedBatchNorm1d(3, momentum=None, **F64)
    means, variances = [], []
    for _ in range(4):
        x, mask = torch.randn(3, 3, 5, generator=gen, **F64), _mask((3, 5), gen)
        m(x, mask)
        rows = x.movedim(1, -1)[mask]
        means.append(rows.mean(0))
        variances.append(rows.var(0))
    torch.testing.assert_close(m.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(m.running_var, torch.stack(variances).mean(0))


@pytest.mark.parametrize("x_shape, no_data", [
    ((4, 3, 6), torch.zeros(4, 6, dtype=torch.bool)),  # all padding
    ((4, 3, 6), torch.arange(24).reshape(4, 6) == 7),  # one valid position: k = 1 on every channel
    ((5, 3), torch.zeros(5, dtype=torch.bool)),  # (B, C) rows, all padding
])
def test_batch_norm_cumulative_average_counts_only_batches_with_data(x_shape, no_data):
    # FINDINGS reproducer: the empty batch was counted, running_mean ~2.0 where the real batches average ~2.8
    gen = _gen(7)
    m = MaskedBatchNorm1d(3, momentum=None, **F64)
    full = torch.ones(no_data.shape, dtype=torch.bool)
    a, b = torch.randn(x_shape, generator=gen, **F64), torch.randn(x_shape, generator=gen, **F64)
    offsets = torch.tensor([5.0, -3.0, 11.0], **F64).reshape((1, 3) + (1,) * (len(x_shape) - 2))
    c = torch.randn(x_shape, generator=gen, **F64) * 2 + offsets  # a different mean on every channel
    for x, mask in ((a, full), (b, no_data), (c, full), (b, no_data)):
        m(x, mask)
    per_channel = lambda t: t.movedim(1, -1).reshape(-1, 3)  # noqa: E731  (positions, C)
    torch.testing.assert_close(m.running_mean, (per_channel(a).mean(0) + per_channel(c).mean(0)) / 2, rtol=1e-14, atol=0)
    torch.testing.assert_close(m.running_var, (per_channel(a).var(0) + per_channel(c).var(0)) / 2, rtol=1e-14, atol=0)
    assert m.num_batches_tracked.item() == 2


def test_batch_norm_channels_with_one_valid_position_keep_running_stats():
    gen = _gen(3)
    m = MaskedBatchNorm1d(3, **F64)
    x = torch.randn(2, 3, 4, generator=gen, **F64)
    only_one = torch.zeros(2, 4, dtype=torch.bool)
    only_one[1, 2] = True
    out = m(x, only_one)
    assert torch.equal(m.running_mean, torch.zeros(3, **F64)) and torch.equal(m.running_var, torch.ones(3, **F64))
    assert m.num_batches_tracked.item() == 1  # with a momentum every training call counts, as in torch
    torch.testing.assert_close(out[1, :, 2], m.bias.detach())  # k = 1: (x - mu) = 0


def test_batch_norm_without_running_stats_uses_masked_batch_stats_in_eval():
    gen = _gen(4)
    m = _affine_module(MaskedBatchNorm1d(3, track_running_stats=False, **F64), gen).eval()
    x, mask = torch.randn(4, 3, 6, generator=gen, **F64), _mask((4, 6), gen)
    torch.testing.assert_close(m(x, mask), _batch_expected(x, mask, m.weight, m.bias, m.eps, "normalize"))


@pytest.mark.theorem("inference_is_affine")
@pytest.mark.parametrize("masked", POLICIES)
def test_batch_norm_eval_uses_running_stats_everywhere(masked):
    gen = _gen(5)
    m = _affine_module(MaskedBatchNorm1d(3, masked=masked, **F64), gen)
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(3, generator=gen, **F64))
        m.running_var.copy_(torch.rand(3, generator=gen, **F64) + 0.5)
    m.eval()
    x, mask = torch.randn(4, 3, 6, generator=gen, **F64), _mask((4, 6), gen)
    eval_out = (x - m.running_mean[:, None]) / torch.sqrt(m.running_var[:, None] + m.eps) * m.weight[:, None] + m.bias[:, None]
    torch.testing.assert_close(m(x, mask), _policy(eval_out, x, mask.unsqueeze(1), masked))


# ---- instance norm: per (sample, channel) statistics; running stats averaged over the samples ---------------

@pytest.mark.parametrize("masked", POLICIES)
def test_instance_norm_outputs_and_running_stats(masked):
    gen = _gen(6)
    m = _affine_module(MaskedInstanceNorm1d(3, affine=True, track_running_stats=True, momentum=0.3, masked=masked, **F64), gen)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    for _ in range(2):
        x = torch.randn(4, 3, 6, generator=gen, **F64)
        mask = _mask((4, 6), gen)
        mask[3] = False
        mask[3, 1] = True  # sample 3 has k = 1: left out of the running average
        g = torch.randn(4, 3, 6, generator=gen, **F64)
        out, gx, gw, gb = _grads(lambda t: m(t, mask), x, [m.weight, m.bias], g)
        expected = torch.empty_like(x)
        means, variances = [], []
        for b in range(4):
            vals = x[b][:, mask[b]]  # (C, k_b)
            mean, var = vals.mean(1, keepdim=True), vals.var(1, correction=0, keepdim=True)
            expected[b] = (x[b] - mean) / torch.sqrt(var + m.eps) * m.weight[:, None] + m.bias[:, None]
            if vals.shape[1] > 1:
                means.append(vals.mean(1))
                variances.append(vals.var(1))
        torch.testing.assert_close(out, _policy(expected, x, mask.unsqueeze(1), masked).detach())
        assert torch.isfinite(gx).all() and torch.isfinite(gw).all() and torch.isfinite(gb).all()
        rm = 0.7 * rm + 0.3 * torch.stack(means).mean(0)  # momentum 0.3, not 0.5: m and 1 - m differ
        rv = 0.7 * rv + 0.3 * torch.stack(variances).mean(0)
        torch.testing.assert_close(m.running_mean, rm)
        torch.testing.assert_close(m.running_var, rv)
    m.eval()
    x, mask = torch.randn(2, 3, 5, generator=gen, **F64), _mask((2, 5), gen)
    eval_out = (x - rm[:, None]) / torch.sqrt(rv[:, None] + m.eps) * m.weight[:, None] + m.bias[:, None]
    torch.testing.assert_close(m(x, mask), _policy(eval_out, x, mask.unsqueeze(1), masked).detach())


def test_instance_norm_unbatched_input_takes_unbatched_mask():
    gen = _gen(7)
    m = MaskedInstanceNorm2d(3, **F64)
    x, mask = torch.randn(3, 4, 5, generator=gen, **F64), _mask((4, 5), gen)
    torch.testing.assert_close(m(x, mask), m(x[None], mask[None])[0])
    torch.testing.assert_close(m(x, mask[None]), m(x[None], mask[None])[0])


# ---- group norm, layer norm, RMS norm: outputs against the mpmath reference / torch on valid tokens ------------

@pytest.mark.parametrize("masked", POLICIES)
def test_group_norm_matches_reference(masked):
    gen = _gen(8)
    m = _affine_module(MaskedGroupNorm(2, 6, masked=masked, **F64), gen)
    x, mask = torch.randn(3, 6, 5, generator=gen, **F64), _mask((3, 5), gen)
    mask[2] = False  # sample 2 has no valid position: passes through (0 under "zero")
    out = m(x, mask)
    expected = reference(x.reshape(3, 2, 3, 5).numpy(), mask.reshape(3, 1, 1, 5).numpy(), dim=(2, 3), eps=m.eps,
                         weight=m.weight.detach().reshape(2, 3, 1).numpy(), bias=m.bias.detach().reshape(2, 3, 1).numpy(),
                         masked=masked)
    np.testing.assert_allclose(out.detach().numpy(), expected.reshape(3, 6, 5), rtol=1e-12, atol=1e-12)
    if masked != "zero":
        assert torch.equal(out[2], x[2])
    g = torch.randn(3, 6, 5, generator=gen, **F64)
    gx, gw, gb = torch.autograd.grad(m(x.requires_grad_(), mask), [x, m.weight, m.bias], g)
    ex, ew, eb = reference_vjp(g.reshape(3, 2, 3, 5).numpy(), x.detach().reshape(3, 2, 3, 5).numpy(),
                               mask.reshape(3, 1, 1, 5).numpy(), dim=(2, 3), eps=m.eps,
                               weight=m.weight.detach().reshape(2, 3, 1).numpy(),
                               bias=m.bias.detach().reshape(2, 3, 1).numpy(), masked=masked)
    for ours, theirs in ((gx, ex), (gw, ew), (gb, eb)):
        np.testing.assert_allclose(ours.numpy(), np.asarray(theirs).reshape(ours.shape), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_float32_running_stats(dtype):
    """Half inputs: output in their dtype, statistics of the exact half values accumulated in float32."""
    gen = _gen(14)
    m = MaskedBatchNorm1d(3, momentum=1.0)
    x, mask = torch.randn(4, 3, 6, generator=gen).to(dtype), _mask((4, 6), gen)
    out = m(x, mask)
    rows = x.double().movedim(1, -1)[mask]
    assert out.dtype == dtype and m.running_mean.dtype == torch.float32
    torch.testing.assert_close(m.running_mean, rows.mean(0).float())
    torch.testing.assert_close(m.running_var, rows.var(0).float())
    m.eval()
    assert m(x, mask).dtype == dtype


@pytest.mark.parametrize("cls, functional", [(MaskedLayerNorm, F.layer_norm), (MaskedRMSNorm, F.rms_norm)])
@pytest.mark.parametrize("masked", POLICIES)
def test_token_mask_equals_torch_on_valid_tokens(cls, functional, masked):
    """Valid tokens: torch's layer on those tokens; padding tokens: x (0 under "zero"); gradients too."""
    gen = _gen(9)
    m = _affine_module(cls(5, eps=1e-4, masked=masked, **F64), gen)
    x, tokens = torch.randn(3, 4, 5, generator=gen, **F64), _mask((3, 4), gen, p=0.5)
    g = torch.randn(3, 4, 5, generator=gen, **F64)
    params = list(m.parameters())

    def expected(t):
        kwargs = {"bias": m.bias} if cls is MaskedLayerNorm else {}
        normed = functional(t, (5,), m.weight, eps=1e-4, **kwargs)
        return torch.where(tokens[..., None], normed, t if masked != "zero" else torch.zeros_like(t))

    _assert_all_close(_grads(lambda t: m(t, tokens), x, params, g), _grads(expected, x, params, g))


@pytest.mark.parametrize("cls, center", [(MaskedLayerNorm, True), (MaskedRMSNorm, False)])
@pytest.mark.parametrize("masked", POLICIES)
def test_elementwise_mask_matches_reference(cls, center, masked):
    gen = _gen(10)
    m = _affine_module(cls((2, 5), eps=1e-3, masked=masked, **F64), gen)
    x, mask = torch.randn(3, 2, 5, generator=gen, **F64), _mask((3, 2, 5), gen)
    bias = m.bias.detach().numpy() if center else None
    expected = reference(x.numpy(), mask.numpy(), dim=(1, 2), eps=1e-3, center=center,
                         weight=m.weight.detach().numpy(), bias=bias, masked=masked)
    np.testing.assert_allclose(m(x, mask).detach().numpy(), expected, rtol=1e-12, atol=1e-12)


# ---- garbage at masked-out positions ---------------------------------------------------------------------

@pytest.mark.parametrize("masked", POLICIES)
@pytest.mark.parametrize("make", [
    lambda: MaskedBatchNorm1d(3, **F64), lambda: MaskedInstanceNorm1d(3, affine=True, track_running_stats=True, **F64),
    lambda: MaskedGroupNorm(3, 3, **F64), lambda: MaskedLayerNorm(6, **F64),
])
def test_garbage_at_masked_positions_changes_nothing_valid(make, masked):
    gen = _gen(11)
    x, mask = torch.randn(4, 3, 6, generator=gen, **F64), _mask((4, 6), gen)
    layer_norm = isinstance(make(), MaskedLayerNorm)
    full = mask[:, None, :].expand(4, 3, 6)
    token = mask[:, None, :].expand(4, 3, 6) if layer_norm else mask
    dirty = torch.where(full, x, torch.tensor([float("nan"), float("inf"), 1e300], **F64).repeat(24)[:72].reshape(4, 3, 6))
    g = torch.where(full, torch.randn(4, 3, 6, generator=gen, **F64), 0)
    results = []
    for data in (x, dirty):
        m = make()
        m.masked = masked
        out, gx, *gp = _grads(lambda t: m(t, token), data, list(m.parameters()), g)
        results.append((torch.where(full, out, 0), torch.where(full, gx, 0), gp, list(m.buffers())))
    (o1, gx1, gp1, b1), (o2, gx2, gp2, b2) = results
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(gx2, gx1)
    _assert_all_close(gp2, gp1)
    _assert_all_close(b2, b1)


# ---- mask conventions ------------------------------------------------------------------------------------

def test_channel_mask_forms_agree():
    gen = _gen(12)
    x, mask = torch.randn(4, 3, 6, generator=gen, **F64), _mask((4, 6), gen)
    m = MaskedBatchNorm1d(3, **F64)
    a, b = m(x, mask), m(x, mask[:, None, :])
    torch.testing.assert_close(a, b)
    per_sample = torch.tensor([True, True, False, True])
    torch.testing.assert_close(m(x, per_sample[:, None]), m(x, per_sample[:, None].expand(4, 6)))


def test_token_mask_forms_agree():
    gen = _gen(13)
    x, tokens = torch.randn(3, 4, 5, generator=gen, **F64), _mask((3, 4), gen)
    m = MaskedLayerNorm(5, **F64)
    torch.testing.assert_close(m(x, tokens), m(x, tokens[..., None]))
    torch.testing.assert_close(m(x, tokens), m(x, tokens[..., None].expand(3, 4, 5)))


@pytest.mark.parametrize("module, x_shape, mask_shape", [
    (MaskedBatchNorm1d(3), (4, 3, 6), (4, 3, 6)),
    (MaskedBatchNorm1d(3), (4, 3, 6), (6,)),
    (MaskedBatchNorm1d(3), (4, 3), (4, 3)),
    (MaskedGroupNorm(1, 3), (4, 3, 6), (4, 5)),
    (MaskedInstanceNorm1d(3), (4, 3, 6), (3, 6)),
    (MaskedLayerNorm(6), (4, 3, 6), (3,)),
    (MaskedLayerNorm(6), (4, 3, 6), (4, 2)),
    (MaskedRMSNorm((3, 6)), (4, 3, 6), (4, 3)),
])
def test_mask_that_fits_no_convention_names_both_shapes(module, x_shape, mask_shape):
    with pytest.raises(ValueError) as err:
        module(torch.randn(x_shape), torch.ones(mask_shape, dtype=torch.bool))
    assert str(tuple(x_shape)) in str(err.value) and str(tuple(mask_shape)) in str(err.value)


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match="bool"):
        MaskedBatchNorm1d(3)(torch.randn(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="expected 4D input"):
        MaskedBatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="num_features=3"):
        MaskedBatchNorm1d(3)(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="normalized_shape"):
        MaskedLayerNorm(5)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="C=6"):
        MaskedGroupNorm(2, 6)(torch.randn(2, 4, 3))
