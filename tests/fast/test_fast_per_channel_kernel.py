"""The per-channel kernel (kernels/per_channel.cpp: per_channel_norm and its backward), which batch norm on CPU
takes when the mask is constant along the channels (the usual (N, 1, L) padding mask) or absent: within the
suite's bounds of the mpmath reference (output, gradients) and of a float64 two-pass reference (the moments for
the running statistics); garbage padding gives the bits of clean padding; the bits do not depend on the thread
count; degenerate channels pass through with the general path's bits; double backward takes the differentiable
closed form; the operators pass opcheck."""

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support.bounds import FORWARD_BOUND, VJP_AFFINE_BOUND, VJP_X_BOUND, forward_error, same_bits, vjp_errors
from support.strategies import channels, like

from masknorm import masked_norm
from masknorm.fast import native, per_channel

pytestmark = pytest.mark.skipif(native.ops() is None, reason="the fused CPU kernels could not be built")

POLICIES = ["normalize", "keep", "zero"]


@st.composite
def kernel_channels(draw, dtype: torch.dtype):
    """channels() with the mask made constant along axis 1 (channel 0's): the layout the kernel takes."""
    case = draw(channels(dtype))
    if case.mask is not None:
        case = replace(case, mask=case.full_mask[:, :1].clone())
    assert per_channel.kernel_for(case.x, case.mask) is not None
    return case


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@given(data=st.data())
def test_the_kernel_is_within_the_bounds(dtype, data):
    case = data.draw(kernel_channels(dtype))
    assert forward_error(case) <= FORWARD_BOUND[dtype]
    ex, ew, eb = vjp_errors(case, like(data.draw, case.x))
    assert ex <= VJP_X_BOUND[dtype] and max(ew, eb) <= VJP_AFFINE_BOUND[dtype], (ex, ew, eb)


@given(data=st.data())
def test_the_moments_are_the_float64_ones_rounded(data):
    """float32 x: mean and unbiased variance within one float32 ulp (the spacing of float32 at the value:
    about u relative for normal numbers, 2^-149 for subnormal ones) of the valid values' two-pass float64
    statistics (math.fsum), the count exact."""
    case = data.draw(kernel_channels(torch.float32))
    mask = case.full_mask
    with torch.no_grad():
        _, (mean, var, count) = per_channel.forward_only(case.x, case.mask, case.weight, case.bias, case.dims,
                                                         case.correction, case.eps, case.masked)
    for c in range(case.x.shape[1]):
        values = case.x[:, c][mask[:, c]].double().tolist()
        k = len(values)
        assert count.flatten()[c] == k
        if k < 2:
            continue
        mu = math.fsum(values) / k
        v = math.fsum((t - mu) ** 2 for t in values) / (k - 1)
        assert abs(mean.flatten()[c].item() - mu) <= _float32_ulp(mu)
        assert abs(var.flatten()[c].item() - v) <= _float32_ulp(v)


def test_the_one_pass_moments_and_their_two_pass_fallback_are_the_float64_ones_rounded():
    """float32 statistics take one pass about the channel's first valid value where c S2 <= 2^20 M2 (c = 2 kBlock +
    2 k / kBlock), else two passes. Channel 0 (mean 0) and 1 (mean 1e4, sigma 1) take the one pass; channel 2's first
    valid value is an outlier (1e4 among N(0, 1) values: c S2 / M2 ~ 1e8) and takes the two passes. Each within one
    float32 ulp of the valid values' two-pass float64 statistics (math.fsum)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 3, 4096, generator=gen, dtype=torch.float64)
    x[:, 1] += 1e4
    mask = torch.rand(32, 1, 4096, generator=gen) > 0.2
    mask[0, 0, :7] = False
    mask[0, 0, 7] = True
    x[0, 2, 7] = 1e4
    x = x.float()
    with torch.no_grad():
        _, (mean, var, count) = per_channel.forward_only(x, mask, None, None, (0, 2), 0, 1e-5, "normalize")
    for c in range(3):
        values = x[:, c][mask[:, 0]].double().tolist()
        k = len(values)
        mu = math.fsum(values) / k
        m2 = math.fsum((t - mu) ** 2 for t in values)
        s2 = math.fsum((t - values[0]) ** 2 for t in values)
        if c == 2:  # beyond the one pass
            assert (2 * 256 + 2 * k / 256) * s2 > 2**20 * m2
        assert count.flatten()[c] == k
        assert abs(mean.flatten()[c].item() - mu) <= _float32_ulp(mu)
        assert abs(var.flatten()[c].item() - m2 / (k - 1)) <= _float32_ulp(m2 / (k - 1))


def _float32_ulp(value: float) -> float:
    """The distance from |value| rounded to float32 to the next float32 up."""
    at = torch.tensor(abs(value), dtype=torch.float32)
    return (torch.nextafter(at, torch.tensor(math.inf)) - at).item()


def _case(dtype=torch.float32, shape=(5, 3, 12), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(shape[0], 1, *shape[2:], generator=gen) > 0.3
    mask[0] = True
    weight = torch.randn(shape[1], 1, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(shape[1], 1, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, mask, weight, bias, g


def _run(x, mask, weight, bias, g, masked, correction=0):
    """(output, the three moments, grad x, grad weight, grad bias) of one recorded call on the kernel."""
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out, *moments = per_channel.PerChannelFunction.apply(leaves[0], mask, leaves[1], leaves[2], (0, 2), correction,
                                                         1e-5, masked)
    assert per_channel.kernel_for(x, mask) is not None
    return (out.detach(), *moments, *torch.autograd.grad(out, leaves, g))


# Above KERNEL_MAX_NUMEL with rows of KERNEL_MIN_ROW or more (the large inputs' kernel route), and rows shorter
# than kBlock (their sums join partial sums across rows).
LARGE, SHORT_ROWS = (40, 12, 300), (600, 4, 50)


@pytest.mark.parametrize("shape", [(5, 3, 12), LARGE], ids=["small", "large"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("garbage", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("masked", POLICIES)
def test_garbage_padding_gives_the_bits_of_clean_padding(masked, garbage, dtype, shape):
    """Output at the valid positions, moments and every gradient (under "normalize" the upstream
    gradient is 0 at masked-out positions: they add nothing)."""
    x, mask, weight, bias, g = _case(dtype, shape)
    full = mask.expand(x.shape)
    if masked == "normalize":
        g = torch.where(full, g, 0.0)
    clean = _run(torch.where(full, x, 0.0), mask, weight, bias, g, masked)
    dirty = _run(torch.where(full, x, garbage), mask, weight, bias, g, masked)
    same_bits(torch.where(full, clean[0], 0.0), torch.where(full, dirty[0], 0.0))
    for a, b in zip(clean[1:], dirty[1:]):
        same_bits(a, b)


@pytest.mark.parametrize("shape", [(24, 6, 700), LARGE, SHORT_ROWS], ids=["small", "large", "short rows"])
@pytest.mark.parametrize("masked", POLICIES)
def test_the_bits_do_not_depend_on_the_thread_count(masked, shape):
    assert per_channel.kernel_takes(torch.empty(shape))
    threads = torch.get_num_threads()
    try:
        runs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            runs.append(_run(*_case(shape=shape, seed=1), masked))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        same_bits(a, b)


@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("masked", POLICIES)
def test_degenerate_channels_pass_through_with_the_general_paths_bits(masked, correction):
    """k - correction <= 0 (no valid position; one, with correction 1): x (0 at masked-out positions under
    "zero"), the upstream gradient likewise, no parameter gradient; the bits of the kernels-off path."""
    x, mask, weight, bias, g = _case()
    mask = torch.zeros_like(mask)
    if correction:
        mask[2, 0, 5] = True
    on = _run(x, mask, weight, bias, g, masked, correction)
    with native.kernels(False):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out, *moments = per_channel.PerChannelFunction.apply(leaves[0], mask, leaves[1], leaves[2], (0, 2), correction,
                                                             1e-5, masked)
        off = (out.detach(), *moments, *torch.autograd.grad(out, leaves, g))
    full = mask.expand(x.shape)
    passed = torch.where(full, x, 0.0) if masked == "zero" else x
    same_bits(on[0], passed)
    same_bits(on[4], torch.where(full, g, 0.0) if masked == "zero" else g)
    assert not on[5].any() and not on[6].any()
    for i in (0, 4, 5, 6):
        same_bits(on[i], off[i])


@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("masked", POLICIES)
def test_the_operators_backward_on_torchs_kernels_after_the_kernels_forward(masked, correction):
    """masknorm::per_channel (what torch.compile calls) with the kernels switched off between its forward and
    its backward: torch's kernels' backward from the kernel's statistics gives the recorded eager call's
    gradients to float64 rounding, and the channels the kernel passed through (correction 1: one valid
    position, every channel) their exact pass-through, not a gradient from placeholder statistics."""
    from masknorm.fast import ops as fast_ops

    x, mask, weight, bias, g = _case(torch.float64)
    if correction:
        mask = torch.zeros_like(mask)
        mask[2, 0, 5] = True
    eager = _run(x, mask, weight, bias, g, masked, correction)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = fast_ops.per_channel_op(leaves[0], mask, leaves[1], leaves[2], correction, 1e-5, masked)[0]
    with native.kernels(False):
        grads = torch.autograd.grad(out, leaves, g)
    same_bits(out.detach(), eager[0])
    for ours, recorded in zip(grads, eager[4:]):
        if correction:
            same_bits(ours, recorded)
        else:
            torch.testing.assert_close(ours, recorded, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("masked", POLICIES)
def test_double_backward_passes_gradgradcheck(masked):
    x, mask, weight, bias, _ = _case(torch.float64, shape=(3, 2, 5), seed=2)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]

    def norm(x, w, b):
        return masked_norm(x, mask, (0, 2), weight=w, bias=b, masked=masked)

    assert norm(*leaves).grad_fn.name() == "PerChannelFunctionBackward"
    assert torch.autograd.gradgradcheck(norm, leaves)


def _layouts(x):
    """x contiguous, with axes 0 and 2 swapped in memory, sliced along axis 2."""
    yield x
    yield x.transpose(0, 2).contiguous().transpose(0, 2)
    yield torch.cat([x, x], 2)[:, :, ::2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("masked", POLICIES)
def test_the_per_channel_operators_pass_opcheck(masked, with_mask, dtype):
    x, mask, weight, bias, g = _case(dtype)
    mask = mask if with_mask else None
    ops = native.ops()
    for xl in _layouts(x):
        torch.library.opcheck(ops.per_channel_norm.default, (xl, mask, weight, bias, 1, 1e-5, masked))
        shift, inv_s = ops.per_channel_norm(xl, mask, weight, bias, 1, 1e-5, masked)[5:7]
        for skip in (None, torch.tensor([False, True, False])):
            torch.library.opcheck(ops.per_channel_norm_backward.default,
                                  (g, xl, mask, weight, shift, inv_s, skip, 1, masked))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("masked", POLICIES)
def test_per_channel_norms_autograd_kernel_passes_opcheck(masked, with_mask, dtype):
    """With a gradient wanted, per_channel_norm's own Autograd kernel records its C++ node (the batch-norm modules'
    lane): opcheck's autograd registration and traced-backward tests, weight and bias of shape (C,) as the modules
    pass them and (C, 1)."""
    x, mask, weight, bias, _ = _case(dtype)
    mask = mask if with_mask else None
    ops = native.ops()
    for w, b in ((weight, bias), (weight.flatten(), bias.flatten())):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        assert ops.per_channel_norm(leaves[0], mask, *leaves[1:], 0, 1e-5, masked)[0].grad_fn.name() == \
            "PerChannelNormBackward"
        torch.library.opcheck(ops.per_channel_norm.default, (leaves[0], mask, *leaves[1:], 0, 1e-5, masked))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "average"])
@pytest.mark.parametrize("with_count", [True, False], ids=["num_batches_tracked", "none"])
def test_per_channel_track_passes_opcheck(dtype, momentum, with_count):
    x, mask, *_ = _case(dtype)
    mean, var, count = native.ops().per_channel_norm(x, mask, None, None, 0, 1e-5, "normalize")[1:4]
    args = (torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype),
            torch.tensor(2) if with_count else None, mean.flatten(), var.flatten(), count.flatten(), momentum)
    torch.library.opcheck(native.ops().per_channel_track.default, args)
