"""The Triton group kernels (masknorm.fast.triton_groups) under Triton's interpreter on CPU tensors,
for each of their views (masknorm.fast.group_views): group/instance norm with a mask per (sample,
position) ("positions"), layer/RMS norm with a mask varying inside the rows ("rows"), and batch norm
over every axis but 1 with any mask ("channels"). Against the mpmath reference within the suite's
bounds, garbage padding giving the bits of clean padding, degenerate groups passed through, each
group's results independent of the other groups' values, batch norm's moments, gradcheck in
float64. Skipped without triton (the `gpu` extra); TRITON_INTERPRET=1 is set before the kernels
are defined.
"""

import functools
import math
import os
from dataclasses import replace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from support.bounds import (FORWARD_BOUND, JVP_BOUND, VJP_AFFINE_BOUND, VJP_X_BOUND, draw_tangents, forward_error,
                            jvp_error, same_bits, vjp_errors)
from support.strategies import DTYPES, EPS_VALUES, POLICIES, channels, like, masked_rows
from test_fast_masked_positions import grouped

import masknorm
from masknorm.fast import backend as fast_backend
from masknorm.fast.group_views import GroupView
from masknorm.functional import masked_norm_with_moments
from masknorm.modules._running import masked_moments

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: it decorates its own functions then
triton = pytest.importorskip("triton")

on_triton = functools.partial(masknorm.masked_norm, backend="triton")
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


def _view(x, mask, weight, bias, dims) -> str:
    """The name of the group kernels' view of a call ("" where another kernel, or none, runs it)."""
    if mask is not None and mask.dim() < x.dim():
        mask = mask.reshape((1,) * (x.dim() - mask.dim()) + tuple(mask.shape))
    how = fast_backend.plan(x, mask, weight, bias, dims)
    return how.name if isinstance(how, GroupView) else ""


@st.composite
def batch_norm_cases(draw, dtype):
    """strategies.channels() with any center and eps (the kernels take RMS and eps = 0 too)."""
    case = draw(channels(dtype))
    return replace(case, center=draw(st.booleans()), eps=draw(st.sampled_from(EPS_VALUES)))


STRATEGIES = {"positions": grouped, "rows": masked_rows, "channels": batch_norm_cases}


@pytest.mark.parametrize("view", STRATEGIES)
@dtypes
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_within_the_suites_bounds(view, dtype, data):
    """Forward, VJP (x, weight, bias) and JVP on the kernels within the suite's u*kappa bounds of the
    mpmath reference, every policy, correction, eps and center."""
    case = data.draw(STRATEGIES[view](dtype))
    assume(_view(case.x, case.mask, case.weight, case.bias, case.dims) == view)
    case = replace(case, call=on_triton)
    assert forward_error(case) <= FORWARD_BOUND[dtype]
    ex, ew, eb = vjp_errors(case, like(data.draw, case.x))
    assert ex <= VJP_X_BOUND[dtype] and max(ew, eb) <= VJP_AFFINE_BOUND[dtype], (ex, ew, eb)
    assert jvp_error(case, *draw_tangents(data, case)) <= JVP_BOUND[dtype]


def _inputs(view: str, dtype: torch.dtype, seed: int = 0):
    """(x, mask, dims, weight, bias) of a small call of each view, with per-sample and scattered padding."""
    gen = torch.Generator().manual_seed(seed)
    if view == "positions":  # group norm: (B, G, C/G, L), a mask per (sample, step)
        x, mask, dims, pshape = torch.randn(3, 2, 2, 6, generator=gen), torch.rand(3, 1, 1, 6, generator=gen) > 0.4, (2, 3), (2, 2, 1)
    elif view == "rows":  # layer norm over the last axis with an elementwise mask
        x, mask, dims, pshape = torch.randn(2, 3, 7, generator=gen), torch.rand(2, 3, 7, generator=gen) > 0.3, (2,), (7,)
    else:  # batch norm over (N, L) of (N, C, L), a mask varying along every axis
        x, mask, dims, pshape = torch.randn(4, 3, 5, generator=gen), torch.rand(4, 3, 5, generator=gen) > 0.4, (0, 2), (3, 1)
    x = x * 3 + 2
    weight, bias = torch.rand(pshape, generator=gen) + 0.5, torch.randn(pshape, generator=gen)
    assert _view(x, mask, weight, bias, dims) == view
    return x.to(dtype), mask, dims, weight.to(dtype), bias.to(dtype)


def _outputs_and_grads(x, mask, dims, weight, bias, grad_out, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    out = on_triton(leaves[0], mask, dims, weight=leaves[1], bias=leaves[2], **options)
    return (out, *torch.autograd.grad(out, leaves, grad_out))


VIEWS = pytest.mark.parametrize("view", ["positions", "rows", "channels"])


@VIEWS
@pytest.mark.parametrize("masked", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_garbage_padding_gives_the_bits_of_clean_padding(view, masked, dtype):
    """NaN, Inf and huge values at masked-out positions of x (and of the upstream gradient under
    "keep"/"zero"; under "normalize" it is 0 there, as the contract asks) leave every valid output,
    every gradient of x at valid positions and the weight and bias gradients with the bits that
    zero padding gives; masked-out outputs are x ("keep") or 0 ("zero"), their gradients likewise."""
    x, mask, dims, weight, bias = _inputs(view, dtype)
    pad = ~mask.expand(x.shape)
    gen = torch.Generator().manual_seed(5)
    grad = torch.randn(x.shape, generator=gen).to(dtype)
    if masked == "normalize":
        grad = grad.masked_fill(pad, 0)
    garbage = torch.tensor([math.nan, math.inf, -math.inf, 6e4]).to(dtype)[torch.randint(0, 4, x.shape, generator=gen)]
    for center in (True, False):
        clean = _outputs_and_grads(x.masked_fill(pad, 0), mask, dims, weight, bias, grad.masked_fill(pad, 0),
                                   masked=masked, center=center)
        dirty_x = torch.where(pad, garbage, x)
        dirty_grad = grad if masked == "normalize" else torch.where(pad, garbage, grad)
        dirty = _outputs_and_grads(dirty_x, mask, dims, weight, bias, dirty_grad, masked=masked, center=center)
        for a, b in zip(clean[:2], dirty[:2]):
            same_bits(a[~pad], b[~pad])
        for a, b in zip(clean[2:], dirty[2:]):
            same_bits(a, b)
        if masked != "normalize":
            for got, passed in ((dirty[0], dirty_x), (dirty[1], dirty_grad)):
                same_bits(got[pad], torch.zeros_like(got[pad]) if masked == "zero" else passed[pad])


@pytest.mark.parametrize("masked", ["normalize", "zero"])  # "keep" passes degenerate groups as "normalize" does
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["float64", "float32", "bfloat16"])
def test_degenerate_groups_pass_through(dtype, masked):
    """Group norm groups (2 channels x 7 steps each) of no valid position (k = 0), of one valid step
    (k = 2) with correction 2 (nu = 0), of equal valid values with eps = 0 (0.1s: only the shift by
    the first value makes their spread exactly 0) and of zeros with eps = 0 (RMS too), beside normal
    groups: the degenerate ones come out as x (0 at masked-out positions under "zero") with the
    upstream gradient as their gradient, nothing is NaN, and the weight and bias gradients are
    those of the normal groups alone (to the rounding of their sum over groups)."""
    gen = torch.Generator().manual_seed(6)
    x = torch.stack([torch.randn(2, 7, generator=gen), torch.randn(2, 7, generator=gen), torch.full((2, 7), 0.1),
                     torch.zeros(2, 7), torch.randn(2, 7, generator=gen) + 4]).unsqueeze(1).to(dtype)
    mask = torch.ones(5, 1, 1, 7, dtype=torch.bool)
    mask[0] = False
    mask[1, ..., 1:] = False
    weight, bias = torch.full((1, 2, 1), 3.0, dtype=dtype), torch.ones(1, 2, 1, dtype=dtype)
    grad = torch.randn(x.shape, generator=gen).to(dtype)
    assert _view(x, mask, weight, bias, (2, 3)) == "positions"
    for center, correction, eps, degenerate in ((True, 0, 0.0, [0, 2, 3]), (False, 0, 0.0, [0, 3]),
                                                (True, 2, 1e-5, [0, 1])):
        options = dict(center=center, eps=eps, correction=correction, masked=masked)
        out, gx, gw, gb = _outputs_and_grads(x, mask, (2, 3), weight, bias, grad, **options)
        for i in degenerate:
            keep = mask[i].expand(x[i].shape) if masked == "zero" else torch.ones_like(x[i], dtype=torch.bool)
            same_bits(out[i][keep], x[i][keep])
            same_bits(gx[i][keep], grad[i][keep])
            assert not out[i][~keep].any() and not gx[i][~keep].any()
        normal = [i for i in range(5) if i not in degenerate]
        assert all(not torch.equal(out[i], x[i]) for i in normal)
        assert not any(t.isnan().any() for t in (out, gx, gw, gb))
        alone = _outputs_and_grads(x[normal], mask[normal], (2, 3), weight, bias, grad[normal], **options)
        for a, b in zip((gw, gb), alone[2:]):
            # the same per-group terms, summed over 5 groups or 2-3 (zeros added exactly; the order may differ)
            torch.testing.assert_close(a, b, rtol=0, atol=8 * torch.finfo(dtype).eps * b.abs().max().item())


@VIEWS
def test_each_groups_results_depend_on_its_own_values_only(view):
    """Changing the values of one group (a sample of group norm, a row, a channel) leaves every other
    group's outputs and gradients with the same bits."""
    x, mask, dims, weight, bias = _inputs(view, torch.float32)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    where = [slice(None)] * x.dim()
    where[1 if view == "channels" else 0] = slice(0, 1)  # group 0 of channels; sample/row 0 otherwise
    if view == "rows":  # a row of at least 3 valid values (a row of one is constant: its gradient is x-free)
        b, t = next((b, t) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t].sum() >= 3)
        where[:2] = slice(b, b + 1), slice(t, t + 1)
    changed = x.clone()
    part = changed[tuple(where)]
    changed[tuple(where)] = part * 1e3 + torch.randn(part.shape, generator=torch.Generator().manual_seed(11))
    first = _outputs_and_grads(x, mask, dims, weight, bias, grad)
    second = _outputs_and_grads(changed, mask, dims, weight, bias, grad)
    others = torch.ones(x.shape, dtype=torch.bool)
    others[tuple(where)] = False
    for a, b in zip(first[:2], second[:2]):
        same_bits(a[others], b[others])
        assert not torch.equal(a[~others], b[~others])


@pytest.mark.parametrize("masked", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["float64", "float32", "bfloat16"])
def test_batch_norm_moments_and_agreement_with_the_cpu_path(dtype, masked):
    """masked_norm_with_moments(backend="triton") over (N, C, L) with a (N, 1, L) and an elementwise
    mask: the output and gradients within a few u of backend="torch" (the CPU fast path), and the
    batch's (mean, unbiased variance, count) per channel within a few u of masked_moments."""
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(6, 4, 11, generator=gen, dtype=torch.float64) * 2 + 5).to(dtype)
    weight = (torch.rand(4, 1, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    bias = torch.randn(4, 1, generator=gen, dtype=torch.float64).to(dtype)
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
    u = torch.finfo(dtype).eps
    for mask in (torch.rand(6, 1, 11, generator=gen) > 0.3, torch.rand(6, 4, 11, generator=gen) > 0.3):
        results = []
        for backend in ("triton", "torch"):
            leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
            out, moments = masked_norm_with_moments(leaves[0], mask, (0, 2), eps=1e-5, weight=leaves[1],
                                                    bias=leaves[2], masked=masked, backend=backend)
            results.append((out, *torch.autograd.grad(out, leaves, grad)))
            if backend == "triton":
                for got, want in zip(moments, masked_moments(x, mask, (0, 2))):
                    assert got.shape == (1, 4, 1)
                    torch.testing.assert_close(got, want, rtol=8 * max(u, 2**-23), atol=0)
        for a, b in zip(*results):
            scale = b.double().abs().max().item()
            torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=16 * u * scale)


@pytest.mark.parametrize("view, masked, center", [("positions", "normalize", True), ("rows", "zero", True),
                                                   ("channels", "keep", False)])
def test_gradcheck_float64(view, masked, center):
    """torch.autograd.gradcheck (first order on the kernels) in float64 with correction 1, one policy
    and center per view; gradgradcheck (the general closed form, reached through the kernels'
    autograd.Function, the same for every view) on the first."""
    x, mask, dims, weight, bias = _inputs(view, torch.float64, seed=9)
    leaves = tuple(t.clone().requires_grad_() for t in (x, weight, bias))

    def fn(x, w, b):
        return on_triton(x, mask, dims, weight=w, bias=b, center=center, masked=masked, correction=1)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)
    if view == "positions":
        assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=True)


def test_wide_groups_span_many_blocks():
    """Instance norm over 3000 steps (three blocks of 1024), batch norm over 40 x 70 values per
    channel (blocks of 16 x 64) and padded-token layer norm over rows of 65600 values (wider than
    the padded-token kernels take: 65 blocks of the group kernels): within a few u of the CPU path
    in float64, with padding."""
    gen = torch.Generator().manual_seed(10)
    cases = [(torch.randn(2, 3, 3000, generator=gen, dtype=torch.float64) + 100, torch.rand(2, 1, 3000, generator=gen) > 0.2, (2,)),
             (torch.randn(40, 2, 70, generator=gen, dtype=torch.float64) - 50, torch.rand(40, 1, 70, generator=gen) > 0.2, (0, 2)),
             (torch.randn(2, 65600, generator=gen, dtype=torch.float64) + 3, torch.tensor([[True], [False]]), (1,))]
    for x, mask, dims in cases:
        assert _view(x, mask, None, None, dims) in ("positions", "channels")
        grad = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        results = []
        for backend in ("triton", "torch"):
            xr = x.clone().requires_grad_()
            out = masknorm.masked_norm(xr, mask, dims, backend=backend)
            results.append((out, torch.autograd.grad(out, xr, grad)[0]))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * b.abs().max().item())
