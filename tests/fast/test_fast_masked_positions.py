"""The fused group kernel (masknorm.fast.masked_positions): group and instance norm over (B, C, *spatial) with a
(B, *spatial) mask, and its row form (layer/RMS norm with a mask varying inside the rows).

Which strategy reaches the path: grouped() below draws only layouts it takes (filtered with
assume: rows of one position, L = 1 < Cg, stay on the general path); strategies.cases() reaches it
whenever the reduced axes are trailing (dim=-1 or (0, 1, 2)), the weight and bias do not vary
where the mask does, and the padded-token path does not take the case first (RMS, a correction,
bfloat16/float16, or a mask varying along the reduced axes), so tests/impl/test_impl_accuracy.py's
general tests run through it too, in every dtype (91 of 300 float32 draws of cases() did).
"""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from support.strategies import DTYPES, POLICIES, Case, affine, any_options, like, masked_rows, values
from support.bounds import (same_bits, FORWARD_BOUND, JVP_BOUND, VJP_AFFINE_BOUND, VJP_X_BOUND, draw_tangents, forward_error,
                                jvp_error, vjp_errors)

import masknorm
from masknorm.fast import masked_positions, native
from masknorm.modules import MaskedGroupNorm, MaskedInstanceNorm1d

_U32 = torch.finfo(torch.float32).eps
pytestmark = pytest.mark.skipif(native.ops() is None, reason="the fused CPU kernels could not be built")


@st.composite
def grouped(draw, dtype: torch.dtype = torch.float64) -> Case:
    """(B, C, S1[, S2]) reduced over the spatial axes (and, for group norm, the channels of a group
    as S1): a mask (B|1, 1, S1|1[, S2|1]) with S1 = 1 when weight/bias vary along S1, or None;
    per-channel weight/bias of x's dtype; any correction, eps, center and policy."""
    shape = tuple(draw(st.integers(1, 4)) for _ in range(draw(st.sampled_from([3, 4]))))
    nd = len(shape)
    dims = tuple(range(2, nd))
    mshape = [draw(st.sampled_from([1, shape[0]])), 1] + [draw(st.sampled_from([1, s])) for s in shape[2:]]
    mask = None
    if draw(st.booleans()):
        n = math.prod(mshape)
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n))).reshape(mshape)
    channels_of_group = mask is None or mshape[2] == 1  # weight may vary along S1 (group norm's C/G)
    pshape = (shape[1], shape[2] if channels_of_group and draw(st.booleans()) else 1) + (1,) * (nd - 3)
    return Case(
        x=draw(values(shape, dims, dtype)),
        mask=mask,
        dim=dims,
        weight=draw(affine(pshape, dtype, exact=True)),
        bias=draw(affine(pshape, dtype, exact=True)),
        **draw(any_options()),
    )


def _takes_path(case: Case) -> bool:
    return masked_positions.layout(case.x, case.mask, case.weight, case.bias, case.dims) is not None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@given(data=st.data())
def test_grouped_within_bound(dtype, data):
    """Forward, VJP (x, weight, bias) and JVP of the fused path within the suite's u*kappa bounds of
    the mpmath reference, every policy, correction, eps and center."""
    case = data.draw(grouped(dtype))
    assume(_takes_path(case))  # not one position per channel row (L = 1 < Cg): those stay on the general path
    assert forward_error(case) <= FORWARD_BOUND[dtype]
    ex, ew, eb = vjp_errors(case, like(data.draw, case.x))
    assert ex <= VJP_X_BOUND[dtype] and max(ew, eb) <= VJP_AFFINE_BOUND[dtype], (ex, ew, eb)
    assert jvp_error(case, *draw_tangents(data, case)) <= JVP_BOUND[dtype]


@given(case=masked_rows())
def test_masked_rows_take_the_row_kernel(case):
    """Every draw of strategies.masked_rows() (a mask varying inside the normalized rows) takes the
    fused kernel: the row layout when a weight or bias varies along the rows, else the group layout
    with one channel per group. The layout-parametrized tests of test_impl_accuracy and
    test_impl_properties check their accuracy and garbage-padding properties."""
    lay = masked_positions.layout(case.x, case.mask, case.weight, case.bias, case.dims)
    assert lay is not None
    assert isinstance(lay, masked_positions.RowLayout) == (case.weight is not None or case.bias is not None)


def _speech(dtype=torch.float32, B=4, C=8, L=300, seed=0):
    """x (B, C, L) offset by 3, lengths drawn at random with one full and one empty sequence."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, C, L, generator=gen) + 3).to(dtype)
    lengths = torch.randint(1, L, (B,), generator=gen)
    lengths[0], lengths[-1] = L, 0
    return x, torch.arange(L) < lengths[:, None]


def _fwd_bwd(module, x, mask, grad):
    x = x.detach().requires_grad_()
    out = module(x, mask)
    out.backward(grad)
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads, out.grad_fn


def _modules(masked, dtype):
    torch.manual_seed(0)
    gn, inn = MaskedGroupNorm(4, 8, masked=masked), MaskedInstanceNorm1d(8, affine=True, masked=masked)
    for m in (gn, inn):
        with torch.no_grad():
            m.weight.normal_()
            m.bias.normal_()
    return gn.to(dtype), inn.to(dtype)


@pytest.mark.parametrize("masked", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_modules_at_speech_sizes_match_general_path(masked, dtype):
    """MaskedGroupNorm(4, 8) and MaskedInstanceNorm1d(8) on (4, 8, 300) run the fused kernel and
    give the general path's outputs and gradients within a few units of the dtype's rounding
    (the general path is the readable definition; both meet the reference bounds above)."""
    x, mask = _speech(dtype)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    for module in _modules(masked, dtype):
        out, gx, gp, fn = _fwd_bwd(module, x, mask, grad)
        assert fn.name() == "MaskedChannelsNormBackward"  # the modules' lane: the fused kernel's node
        with native.kernels(False):
            out_g, gx_g, gp_g, _ = _fwd_bwd(module, x, mask, grad)
        u = torch.finfo(dtype).eps
        torch.testing.assert_close(out, out_g, rtol=4 * u, atol=4 * u * 4)
        torch.testing.assert_close(gx, gx_g, rtol=8 * u, atol=8 * u * gx_g.abs().max().item())
        for a, b in zip(gp, gp_g):
            torch.testing.assert_close(a, b, rtol=8 * u, atol=8 * u * b.abs().max().item())


@pytest.mark.parametrize("masked", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_garbage_padding_never_leaks(masked, dtype):
    """NaN, Inf and 1e38 at masked-out positions of x (and, under "keep"/"zero", of the upstream
    gradient; under "normalize" the upstream gradient there is 0) leave every valid output and
    every gradient with the bits that finite padding gives."""
    x, mask = _speech(dtype)
    pad = ~mask.unsqueeze(1).expand_as(x)
    gen = torch.Generator().manual_seed(2)
    grad = torch.randn(x.shape, generator=gen).to(dtype)
    if masked == "normalize":
        grad = torch.where(pad, 0, grad)
    garbage = torch.tensor([math.nan, math.inf, -math.inf, 1e38]).to(dtype)[torch.randint(0, 4, x.shape, generator=gen)]
    dirty_x = torch.where(pad, garbage, x)
    dirty_grad = grad if masked == "normalize" else torch.where(pad, garbage, grad)
    for module in _modules(masked, dtype):
        out, gx, gp, _ = _fwd_bwd(module, x, mask, grad)
        out_d, gx_d, gp_d, _ = _fwd_bwd(module, dirty_x, mask, dirty_grad)
        same_bits(out[~pad], out_d[~pad])
        if masked == "zero":
            same_bits(out_d[pad], torch.zeros_like(out_d[pad]))
        if masked == "keep":
            same_bits(out_d[pad], dirty_x[pad])
        same_bits(gx[~pad], gx_d[~pad])
        if masked != "normalize":
            same_bits(gx_d[pad], torch.zeros_like(gx_d[pad]) if masked == "zero" else dirty_grad[pad])
        for a, b in zip(gp, gp_d):
            same_bits(a, b)


def test_degenerate_and_out_of_range_groups():
    """An empty sequence (k = 0), a sequence of one step with correction 1 (nu = 0), a constant
    group with eps = 0 and a group at 1e-30 (squares underflow float32) in one call: the
    degenerate ones pass x through (0 at padding under "zero") with the identity (or zero) as
    their gradient and add nothing to the weight gradient; the others are redone with the general
    statistics; all within a few u of the general path (the passed-through groups exactly)."""
    x = torch.randn(4, 2, 6, generator=torch.Generator().manual_seed(3))
    x[2, 0] = 1.5
    x[3, 1] *= 1e-30
    mask = torch.tensor([[False] * 6, [True] + [False] * 5, [True] * 6, [True] * 4 + [False] * 2])
    w = torch.randn(2, 1, requires_grad=True)
    grad = torch.randn_like(x)
    for masked in POLICIES:
        for correction in (0, 1):
            args = dict(dim=-1, correction=correction, eps=0.0, weight=w, masked=masked)
            assert masked_positions.layout(x, mask.unsqueeze(1), w, None, (2,)) is not None
            results = []
            for on in (True, False):
                xr = x.clone().requires_grad_()
                with native.kernels(on):
                    out = masknorm.masked_norm(xr, mask.unsqueeze(1), **args)
                    gx, gw = torch.autograd.grad(out, (xr, w), grad)
                results.append((out, gx, gw))
            for a, b in zip(*results):
                torch.testing.assert_close(a, b, rtol=8 * _U32, atol=8 * _U32 * b.abs().max().item())
            out, gx, _ = results[0]
            keep = mask[0].expand(2, 6) if masked == "zero" else torch.ones(2, 6, dtype=torch.bool)
            assert torch.equal(out[0][keep], x[0][keep]) and torch.equal(gx[0][keep], grad[0][keep])
            assert torch.equal(out[2, 0], x[2, 0])  # constant, eps = 0: passed through


@pytest.mark.parametrize("elementwise", [False, True], ids=["lengths", "elementwise"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_one_pass_statistics_match_general_path(dtype, elementwise):
    """Below float64 the kernels' statistics take one pass shifted by a group's (row's) first valid
    value s, kept where (kMomentBlock + k/kMomentBlock) F <= 2^20 with F = 1 + k (mu - s)^2 / ss,
    else two passes. A first value far out (F about 650 at k = 700: two passes; about 190 at
    k = 200: one pass, near the limit) and groups at 1e3 with a first value close (F about 2), with a
    lengths mask (group kernel) or one masking 10% of the elements besides (row kernel): outputs and
    gradients within a few u of the general path."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 700, dtype=torch.float64, generator=gen)
    x[0, 0, 0] = 100.0
    x[1] += 1e3
    x[2, 1, 0] = -100.0
    x, grad = x.to(dtype), torch.randn(x.shape, generator=gen).to(dtype)
    mask = (torch.arange(700) < torch.tensor([[700], [450], [200]])).unsqueeze(1)
    weight = None
    if elementwise:  # a weight per position: the row kernel (masked_row_norm)
        mask = mask & (torch.rand(3, 2, 700, generator=gen) > 0.1)
        mask[..., 0] = True
        weight = (torch.rand(700, generator=gen) + 0.5).to(dtype)
    else:
        assert masked_positions.layout(x, mask, None, None, (2,)) is not None
    # float64 takes the two passes, whose difference from the general path reaches u kappa (kappa 1e3)
    tol = 8 * torch.finfo(dtype).eps * (1e3 if dtype == torch.float64 else 1.0)
    results = []
    for on in (True, False):
        xr = x.clone().requires_grad_()
        with native.kernels(on):
            out = masknorm.masked_norm(xr, mask, dim=-1, weight=weight, masked="zero")
            results.append((out, torch.autograd.grad(out, xr, grad)[0]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def test_gradcheck_and_double_backward_in_float64():
    """gradcheck of the fused path (first derivatives from the kernel); gradgradcheck falls back
    to the general formulas (grad mode on inside backward)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 2, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.rand(3, 1, 1, 5, generator=gen) > 0.3
    mask[0, ..., 0] = True
    w = torch.randn(4, 2, 1, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(4, 2, 1, dtype=torch.float64, generator=gen, requires_grad=True)
    assert masked_positions.layout(x, mask, w, b, (2, 3)) is not None
    for masked in POLICIES:
        def fn(x, w, b):
            return masknorm.masked_norm(x, mask, (2, 3), weight=w, bias=b, masked=masked, correction=1)

        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_bits_do_not_depend_on_thread_count():
    """Each group is one thread's work and the weight gradient adds samples in a fixed order."""
    x, mask = _speech(torch.float32, B=8, C=16, L=500)
    gn = MaskedGroupNorm(4, 16)
    grad = torch.randn_like(x)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_fwd_bwd(gn, x, mask, grad)[:3])
    finally:
        torch.set_num_threads(before)
    (o1, g1, p1), (o2, g2, p2) = results
    assert torch.equal(o1, o2) and torch.equal(g1, g2) and all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_layout_is_kept_per_signature():
    """layout() answers from shapes alone and keeps its answer per signature: the same signature
    gets the same Layout back, another mask shape its own, and a weight of another dtype or the
    kernels switched off get None (checked on every call, not kept)."""
    x, w = torch.randn(2, 4, 3, 5), torch.randn(4, 3, 1)
    per_sample, shared = torch.ones(2, 1, 1, 5, dtype=torch.bool), torch.ones(1, 1, 1, 5, dtype=torch.bool)
    lay = masked_positions.layout(x, per_sample, w, None, (2, 3))
    assert lay.sizes() == (2, 4, 3, 5)
    assert masked_positions.layout(x.clone(), per_sample.clone(), w.clone(), None, (2, 3)) is lay
    assert masked_positions.layout(x, shared, w, None, (2, 3)).sizes() == (1, 8, 3, 5)
    assert masked_positions.layout(x, per_sample, w.double(), None, (2, 3)) is None
    with native.kernels(False):
        assert masked_positions.layout(x, per_sample, w, None, (2, 3)) is None
    assert masked_positions.layout(x, per_sample, w, None, (2, 3)) is lay


@pytest.mark.parametrize("gaps", [10, 100], ids=["short gaps", "long gaps"])
def test_a_masked_out_output_that_overflows_in_float32_is_repaired(gaps):
    """Under "normalize" a masked-out 3e38 in a group of spread 0.01 has (x - mu) rstd beyond float32 while
    weight 1e-6 brings the output back in range: the kernel's probe of the masked-out outputs (the whole group
    for few masked-out positions, each gap for many) finds the inf and the output is the general path's, finite."""
    gen = torch.Generator().manual_seed(0)
    x = 1 + 0.01 * torch.randn(2, 4, 200, generator=gen)
    mask = torch.arange(200) < torch.tensor([[200], [200 - gaps]])
    x[1, :, 200 - gaps:] = 3e38
    module = MaskedGroupNorm(2, 4)
    with torch.no_grad():
        module.weight.fill_(1e-6)
        out = module(x, mask)
        with native.kernels(False):
            expected = module(x, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=0)
