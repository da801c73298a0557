"""Properties of masknorm.masked_norm that follow from the contract without computing any expected
value: invariance to rescaling and shifting, exact pass-through of constant groups, padding that
holds garbage, equivariance under permutations of reduced axes, a masked group as its valid
values alone, and independence of groups.

Where two computed outputs are compared up to rounding, both are within FORWARD_BOUND u*kappa of
the same exact value (the inputs are exact in the dtype, so the exact outputs agree), hence
within FORWARD_BOUND u (kappa_1 + kappa_2) |gamma| + 2 |beta| of each other: the bound used.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import masknorm
import masknorm.reference as ref
from support.strategies import (
    DTYPES,
    Case,
    cases,
    channels,
    degenerate,
    grouped,
    impl_jvp,
    impl_vjp,
    like,
    masked_rows,
    padded_tokens,
    padded_tokens_on_torch_kernels,
    passes_through,
    zeroed,
)
from support.bounds import FORWARD_BOUND

F32 = torch.float32
NAN, INF = float("nan"), float("inf")


def _agreement(a: torch.Tensor, b: torch.Tensor, case_a: Case, case_b: Case, where=None) -> float:
    """max |a - b| / (u ((kappa_a + kappa_b) |gamma| + 2 |beta|)) over the positions `where` (all
    when None); a, b in x's shape, gamma and beta those of case_a."""
    where = torch.ones(a.shape, dtype=torch.bool) if where is None else where
    shape = case_a.x.shape
    kappa = (case_a.kappa() + case_b.kappa())[where.numpy()]
    weight = None if case_a.weight is None else case_a.weight.expand(shape)[where]
    bias = None if case_a.bias is None else 2 * case_a.bias.double().expand(shape)[where]
    return ref.max_error_in_ukappa(a[where], b[where].double(), kappa, weight=weight, bias=bias)


@st.composite
def grid_cases(draw, dtype=F32, eps_values=(0.0,), centers=(True, False)) -> Case:
    """A Case whose x holds integers times 2^-10 of at most 20 bits (offset up to 2^9): any product
    with a 4-bit mantissa, or sum with such a grid value, is exact in float32."""
    base = draw(cases(dtype, eps_values=eps_values, centers=centers))
    n = base.x.numel()
    offset = draw(st.sampled_from([0] + [s * 2**j for s in (-1, 1) for j in range(0, 20, 3)]))
    ints = draw(st.lists(st.integers(-(2**10), 2**10), min_size=n, max_size=n))
    x = (torch.tensor(ints, dtype=torch.float64) + offset).reshape(base.x.shape) * 2.0**-10
    return replace(base, x=x.to(dtype))


@pytest.mark.theorem("scale_invariance")
@pytest.mark.parametrize("dtype", [F32, torch.float64], ids=["float32", "float64"])
@given(data=st.data())
def test_scale_invariance(dtype, data):
    """With eps = 0, masked_norm(a x) = masked_norm(x) up to rounding for a = m 2^k, k in [-100, 100]
    (1e-30 .. 1e30: squares of a x overflow or underflow float32), where x is normalized; pass-through
    positions give a x exactly, zeroed ones 0."""
    case = data.draw(grid_cases(dtype))
    a = data.draw(st.integers(8, 15)) / 8 * 2.0 ** data.draw(st.integers(-100, 100))
    scaled = replace(case, x=case.x * a)
    assert torch.equal(scaled.x.double(), case.x.double() * a)  # the scaling is exact
    y, ya = case.run(), scaled.run()
    through, zero = passes_through(case), zeroed(case)
    assert torch.equal(ya[through], scaled.x[through]) and bool((ya[zero] == 0).all())
    err = _agreement(ya, y, case, case, ~(through | zero))
    assert err <= FORWARD_BOUND[dtype], f"y(a x) vs y(x): {err:.3g} u*kappa (a = {a:g})"


@pytest.mark.theorem("shift_invariance")
@pytest.mark.parametrize("dtype", [F32, torch.float64], ids=["float32", "float64"])
@given(data=st.data())
def test_shift_invariance(dtype, data):
    """For a centered norm, masked_norm(x + b) = masked_norm(x) up to rounding at normalized
    positions (b on the same grid, |b| up to 2^9: the sum is exact); pass-through positions give x + b."""
    case = data.draw(grid_cases(dtype, eps_values=(0.0, 1e-5, 0.5), centers=(True,)))
    b = data.draw(st.integers(-(2**19), 2**19)) * 2.0**-10
    shifted = replace(case, x=case.x + b)
    assert torch.equal(shifted.x.double(), case.x.double() + b)  # the shift is exact
    y, yb = case.run(), shifted.run()
    through, zero = passes_through(case), zeroed(case)
    assert torch.equal(yb[through], shifted.x[through]) and bool((yb[zero] == 0).all())
    err = _agreement(yb, y, shifted, case, ~(through | zero))
    assert err <= FORWARD_BOUND[dtype], f"y(x + b) vs y(x): {err:.3g} u*kappa (b = {b:g})"


@pytest.mark.theorem("degenerate_passthrough")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@given(data=st.data())
def test_constant_groups_pass_through_bitwise(dtype, data):
    """With eps = 0 and every group's valid values equal (RMS: zero), every group is degenerate:
    the output is x bit for bit (0 at masked-out positions under "zero"), weight and bias are
    ignored, grad_x is the upstream gradient (or 0), grad_weight and grad_bias are 0, and the
    tangent is x_dot (or 0)."""
    case = data.draw(cases(dtype, eps_values=(0.0,)))
    if case.center:
        level = like(data.draw, case.x).amax(case.dims, keepdim=True)
        x = torch.where(case.full_mask, level, case.x)
    else:
        x = torch.where(case.full_mask, torch.zeros((), dtype=dtype), case.x)
    case = replace(case, x=x)
    assert bool(degenerate(case).all())
    zero = zeroed(case)
    out = case.run()
    assert out.dtype == dtype and torch.equal(out, torch.where(zero, 0, case.x))
    g = like(data.draw, case.x)
    gx, gw, gb = impl_vjp(case, g)
    assert torch.equal(gx, torch.where(zero, 0, g))
    for grad in (gw, gb):
        assert grad is None or torch.equal(grad, torch.zeros_like(grad))
    x_dot = like(data.draw, case.x)
    assert torch.equal(impl_jvp(case, x_dot), torch.where(zero, 0, x_dot))


@st.composite
def garbage_like(draw, t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's shape and dtype holding NaN, +-Inf and 1e30 (inf in float16)."""
    n = t.numel()
    return torch.tensor(draw(st.lists(st.sampled_from([NAN, INF, -INF, 1e30, -1e30]), min_size=n, max_size=n)),
                        dtype=torch.float64).reshape(t.shape).to(t.dtype)


def _assert_garbage_changes_nothing(clean: Case, junk: torch.Tensor, g: torch.Tensor, junk_g, x_dot: torch.Tensor):
    """clean's padding replaced by junk (and, under "keep"/"zero", the upstream gradient g's padding
    by junk_g; g is 0 there): the contract of test_garbage_padding below."""
    valid = clean.full_mask
    dirty = replace(clean, x=torch.where(valid, clean.x, junk))
    out_clean, out_dirty = clean.run(), dirty.run()
    assert torch.equal(out_dirty[valid], out_clean[valid])
    if clean.masked == "keep":
        torch.testing.assert_close(out_dirty[~valid], junk[~valid], rtol=0, atol=0, equal_nan=True)
    if clean.masked == "zero":
        assert bool((out_dirty[~valid] == 0).all())

    g_dirty = g if clean.masked == "normalize" else torch.where(valid, g, junk_g)
    grads_clean, grads_dirty = impl_vjp(clean, g), impl_vjp(dirty, g_dirty)
    assert torch.equal(grads_dirty[0][valid], grads_clean[0][valid])
    if clean.masked == "normalize":
        assert torch.equal(grads_dirty[0], grads_clean[0]) and not bool(grads_dirty[0].isnan().any())
    if clean.masked == "keep":
        torch.testing.assert_close(grads_dirty[0][~valid], g_dirty[~valid], rtol=0, atol=0, equal_nan=True)
    if clean.masked == "zero":
        assert bool((grads_dirty[0][~valid] == 0).all())
    for a, b in zip(grads_dirty[1:], grads_clean[1:]):
        assert (a is None and b is None) or torch.equal(a, b)

    assert torch.equal(impl_jvp(dirty, x_dot)[valid], impl_jvp(clean, x_dot)[valid])


@pytest.mark.theorem("padding_invariance")
@pytest.mark.parametrize("layout", [cases, padded_tokens, padded_tokens_on_torch_kernels, masked_rows, channels],
                         ids=["any", "padded-tokens", "padded-tokens-torch-kernels", "masked-rows", "channels"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@given(data=st.data())
def test_garbage_padding(layout, dtype, data):
    """NaN, +-Inf or 1e30 at masked-out positions leaves every valid output, and every gradient
    and tangent at valid positions, bit for bit as with finite padding; grad_weight and grad_bias
    are unchanged. Under "normalize" the upstream gradient at masked-out positions is 0 and grad_x
    is then unchanged and NaN-free everywhere (it may be +-inf where the true gradient exceeds
    the dtype's range, as ~1e7 does float16's, with clean padding alike); under "keep"/"zero" the upstream gradient there is
    garbage too, and grad_x there is that garbage ("keep") or 0 ("zero"); outputs there are the
    garbage ("keep") or 0 ("zero"). The fast paths' layouts are drawn on purpose: their fused
    kernels meet the garbage and must fall back to computations that give the same bits."""
    clean = data.draw(layout(dtype).filter(lambda c: c.mask is not None and not bool(c.mask.all())))
    junk = data.draw(garbage_like(clean.x))
    g = torch.where(clean.full_mask, like(data.draw, clean.x), 0)
    junk_g = None if clean.masked == "normalize" else data.draw(garbage_like(clean.x))
    _assert_garbage_changes_nothing(clean, junk, g, junk_g, like(data.draw, clean.x))


def _fixed_garbage(t: torch.Tensor, shift: int) -> torch.Tensor:
    """NaN, +Inf, -Inf, 1e30 in turn over t's positions (starting at the shift-th)."""
    cycle = torch.tensor([NAN, INF, -INF, 1e30], dtype=torch.float64)
    return cycle[(torch.arange(t.numel()) + shift) % 4].reshape(t.shape).to(t.dtype)


def _fixed_layout(name: str, dtype: torch.dtype, masked: str) -> Case:
    """One case of each path's layout, seeded; every masked group keeps >= 2 valid positions."""
    gen = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    if name in ("padded-tokens", "padded-tokens-torch-kernels"):
        x, mask, dim, param = rand(3, 4, 6), torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]), -1, (6,)
        mask = mask.bool().reshape(3, 4, 1)
    elif name == "masked-rows":
        x, mask, dim, param = rand(3, 4, 6), torch.rand(3, 4, 6, generator=gen) < 0.6, -1, (6,)
        mask[..., :2] = True
    elif name == "channels":
        x, mask, dim, param = rand(4, 3, 6), torch.rand(4, 1, 6, generator=gen) < 0.6, (0, 2), (3, 1)
        mask[0, 0, :2] = True
    else:  # "general": a masked middle axis, per-position parameters
        x, mask, dim, param = rand(3, 5, 4), torch.tensor([1, 0, 1, 1, 0]).bool().reshape(1, 5, 1), 1, (5, 4)
    return Case(x=x, mask=mask, dim=dim, masked=masked, weight=rand(*param), bias=rand(*param),
                fused_kernel=name != "padded-tokens-torch-kernels")


@pytest.mark.theorem("padding_invariance")
@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
@pytest.mark.parametrize("dtype", [torch.float64, F32], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", ["general", "padded-tokens", "padded-tokens-torch-kernels", "masked-rows", "channels"])
def test_garbage_padding_fixed_cases(name, dtype, masked):
    """test_garbage_padding's contract on one fixed case per path (quick and deterministic; the
    hypothesis sweep is in the slow set): garbage padding never reaches a valid output, a VJP
    sum (grad_x at valid positions, grad_weight, grad_bias) or a tangent."""
    clean = _fixed_layout(name, dtype, masked)
    gen = torch.Generator().manual_seed(4)
    g = torch.where(clean.full_mask, torch.randn(clean.x.shape, generator=gen, dtype=torch.float64).to(dtype), 0)
    x_dot = torch.randn(clean.x.shape, generator=gen, dtype=torch.float64).to(dtype)
    _assert_garbage_changes_nothing(clean, _fixed_garbage(clean.x, 0), g, _fixed_garbage(clean.x, 1), x_dot)


def test_garbage_padding_where_the_true_gradient_overflows_float16():
    """x = [0, 0, 2^-23] with eps = 0 has gradients near 4e6, beyond float16's range: grad_x is
    +-inf with clean padding and, bit for bit, with garbage padding; never NaN."""
    x = torch.tensor([[0.0, 0.0, 2.0**-23, 5.0]], dtype=torch.float16)
    mask = torch.tensor([[True, True, True, False]])
    g = torch.tensor([[1.0, 0.5, -1.0, 0.0]], dtype=torch.float16)
    grads = []
    for pad in (5.0, NAN, INF):
        xp = x.clone().index_fill_(1, torch.tensor([3]), pad).requires_grad_()
        masknorm.masked_norm(xp, mask, -1, eps=0.0).backward(g)
        grads.append(xp.grad)
    assert bool(grads[0][0, :2].isinf().all()) and not bool(grads[0].isnan().any())
    assert all(torch.equal(gr, grads[0]) for gr in grads[1:])


@pytest.mark.theorem("permutation_equivariance")
@given(data=st.data())
def test_permutation_equivariance(data):
    """Permuting the positions along a reduced axis (x, mask, weight and bias together) permutes
    the output the same way, up to rounding (float64, float32)."""
    dtype = data.draw(st.sampled_from([torch.float64, F32]))
    case = data.draw(cases(dtype))
    axis = data.draw(st.sampled_from(case.dims))
    perm = torch.tensor(data.draw(st.permutations(range(case.x.shape[axis]))))
    shape = case.x.shape

    def permuted(t):
        return None if t is None else t.expand(shape).index_select(axis, perm)

    moved = replace(case, x=permuted(case.x), mask=permuted(case.full_mask), weight=permuted(case.weight),
                    bias=permuted(case.bias))
    err = _agreement(moved.run(), case.run().index_select(axis, perm), moved, moved)
    assert err <= FORWARD_BOUND[dtype], f"permuted output vs output permuted: {err:.3g} u*kappa"


@pytest.mark.theorem("valid_values_alone")
@given(data=st.data())
def test_masked_group_equals_its_valid_values_alone(data):
    """At the valid positions of a group, the output equals that of masked_norm on the group's
    valid values alone (a 1-d tensor, no mask, their weights and biases), up to rounding."""
    dtype = data.draw(st.sampled_from([torch.float64, F32]))
    case = data.draw(cases(dtype).filter(lambda c: c.mask is not None))
    out, x, m, w, b = (grouped(case, t) for t in (case.run(), case.x, case.full_mask, case.weight, case.bias))
    kappa = grouped(case, torch.from_numpy(case.kappa()))
    for g in range(x.shape[0]):
        valid = m[g]
        if not valid.any():
            continue
        alone = replace(case, x=x[g][valid], mask=None, dim=-1,
                        weight=None if w is None else w[g][valid], bias=None if b is None else b[g][valid])
        bias = None if alone.bias is None else 2 * alone.bias.double()
        err = ref.max_error_in_ukappa(out[g][valid], alone.run().double(), 2 * kappa[g][valid].numpy(),
                                      weight=alone.weight, bias=bias)
        assert err <= FORWARD_BOUND[dtype], f"group {g}: {err:.3g} u*kappa"


@pytest.mark.parametrize("layout", [cases, padded_tokens, padded_tokens_on_torch_kernels, masked_rows, channels],
                         ids=["any", "padded-tokens", "padded-tokens-torch-kernels", "masked-rows", "channels"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@given(data=st.data())
def test_groups_are_independent(layout, dtype, data):
    """Changing x (to other finite values) in every group but one leaves that group's output, and
    its gradient and tangent, bit for bit unchanged."""
    case = data.draw(layout(dtype))
    group_shape = [1 if d in case.dims else s for d, s in enumerate(case.x.shape)]
    n_groups = int(np.prod(group_shape))
    chosen = data.draw(st.integers(0, n_groups - 1))
    keep = (torch.arange(n_groups).reshape(group_shape) == chosen).expand(case.x.shape)
    other = replace(case, x=torch.where(keep, case.x, like(data.draw, case.x, -4.0, 4.0)))
    assert torch.equal(other.run()[keep], case.run()[keep])
    g = like(data.draw, case.x)
    assert torch.equal(impl_vjp(other, g)[0][keep], impl_vjp(case, g)[0][keep])
    x_dot = like(data.draw, case.x)
    assert torch.equal(impl_jvp(other, x_dot)[keep], impl_jvp(case, x_dot)[keep])
