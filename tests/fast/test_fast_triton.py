"""The Triton kernels (masknorm.fast.triton_padded_rows) under Triton's interpreter on CPU tensors:
masked_norm(..., backend="triton") against the mpmath reference within the CPU path's bounds
(test_impl_accuracy), garbage padding giving the bits of clean padding, degenerate rows passed
through, gradcheck in float64, the backend switch's errors. Skipped without triton (the `gpu`
extra); TRITON_INTERPRET=1 is set here before the kernels are defined (triton reads it then).
"""

import functools
import importlib.util
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import masknorm
from support.strategies import DTYPES, EPS_VALUES, POLICIES, Case, like, padded_tokens
from support.bounds import (
    FORWARD_BOUND, JVP_BOUND, VJP_AFFINE_BOUND, VJP_X_BOUND, assert_wide_token_rows_within_bound, draw_tangents,
    forward_error, jvp_error, vjp_errors,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (gpu extra)")
if HAS_TRITON:
    os.environ.setdefault("TRITON_INTERPRET", "1")

on_triton = functools.partial(masknorm.masked_norm, backend="triton")
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


def test_import_and_cpu_calls_do_not_import_triton():
    """triton is an optional dependency imported only by a call that runs the kernels: importing
    masknorm and normalizing CPU tensors (backend "auto") leave it unimported."""
    code = ("import sys, torch, masknorm; x = torch.randn(2, 3, 4); "
            "masknorm.masked_norm(x, torch.ones(2, 3, 1, dtype=torch.bool)).sum(); "
            "assert 'triton' not in sys.modules, 'triton was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


@needs_triton
@dtypes
@settings(max_examples=12)
@given(data=st.data())
def test_within_the_cpu_paths_bounds(dtype, data):
    """Padded tokens (layer and RMS norm over the trailing axes of (B, T, L) or (B, T, H, L), one
    flag per token, every policy and eps, correction 0 or 1) on the kernels: forward, VJP and JVP
    within test_impl_accuracy's bounds of the mpmath reference."""
    case = data.draw(padded_tokens(dtype))
    case = replace(case, correction=data.draw(st.sampled_from([0, 1])), call=on_triton)
    assert forward_error(case) <= FORWARD_BOUND[dtype]
    ex, ew, eb = vjp_errors(case, like(data.draw, case.x))
    assert ex <= VJP_X_BOUND[dtype] and max(ew, eb) <= VJP_AFFINE_BOUND[dtype], (ex, ew, eb)
    assert jvp_error(case, *draw_tangents(data, case)) <= JVP_BOUND[dtype]


# Rows side by side: padded, valid values all equal, kappa ~ 1e3, a plain one, and one of values so
# small that their squares underflow (float16: near its smallest normal), which the kernels scale
# by a power of two first.
SPECIAL_X = torch.tensor([
    [3.0, -1.0, 0.5, 2.0, 7.0],
    [1.5, 1.5, 1.5, 1.5, 1.5],
    [1000.25, 999.0, 1000.5, 999.75, 1001.0],
    [0.5, -2.0, 1.25, 3.0, -0.75],
    [3.0, -1.0, 2.0, 5.0, 1.0],
], dtype=torch.float64)
TINY = {torch.float64: 1e-160, torch.float32: 1e-25, torch.bfloat16: 1e-25, torch.float16: 1e-4}
SPECIAL_VALID = torch.tensor([False, True, True, True, True]).reshape(5, 1)


@needs_triton
@pytest.mark.parametrize("masked", POLICIES)
@pytest.mark.parametrize("eps", EPS_VALUES)
@dtypes
def test_special_rows_within_bounds(dtype, eps, masked):
    """A padded row, a constant row, kappa ~ 1e3 and a tiny-valued row, centered and RMS, correction
    0 and 1, with weight and bias: forward, VJP and JVP within their bounds."""
    gen = torch.Generator().manual_seed(3)
    x = SPECIAL_X.clone()
    x[4] *= TINY[dtype]
    weight, bias = (1 + torch.rand(5, generator=gen)).to(dtype), torch.randn(5, generator=gen).to(dtype)
    grad_out, x_dot = (torch.randn(5, 5, generator=gen).to(dtype) for _ in range(2))
    for center in (True, False):
        for correction in (0, 1):
            case = Case(x=x.to(dtype), mask=SPECIAL_VALID, dim=-1, correction=correction, eps=eps, center=center,
                        masked=masked, weight=weight, bias=bias, call=on_triton)
            assert forward_error(case) <= FORWARD_BOUND[dtype]
            ex, ew, eb = vjp_errors(case, grad_out)
            assert ex <= VJP_X_BOUND[dtype] and max(ew, eb) <= VJP_AFFINE_BOUND[dtype], (ex, ew, eb)
            assert jvp_error(case, x_dot, torch.ones(5, dtype=dtype), None) <= JVP_BOUND[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_wide_rows_within_bound(dtype):
    """Rows of 1500 features (a block of 2048, partly outside the row), offset 1e3 (kappa ~ 1e3), two
    of 6 tokens padded, the 6 rows over the backward's 4 programs: forward and VJP within bound."""
    assert_wide_token_rows_within_bound(dtype, call=on_triton)


def _outputs_and_grads(x, mask, weight, bias, grad_out, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    out = on_triton(leaves[0], mask, -1, weight=leaves[1], bias=leaves[2], **options)
    return (out, *torch.autograd.grad(out, leaves, grad_out))


@needs_triton
@pytest.mark.parametrize("masked", POLICIES)
@pytest.mark.parametrize("center", [True, False], ids=["center", "rms"])
@dtypes
def test_garbage_padding_gives_the_bits_of_clean_padding(dtype, center, masked):
    """NaN/Inf in the padded rows of x, and in their upstream gradient, change nothing in the valid
    rows' outputs and gradients, nor in the weight and bias gradients, bit for bit; the padded rows
    come out as x (0 under "zero"), their gradient as the upstream one (0 under "zero")."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 4, 6, generator=gen) * 2 + 1).to(dtype)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool).unsqueeze(-1)
    weight, bias = torch.randn(6, generator=gen).to(dtype), torch.randn(6, generator=gen).to(dtype)
    grad_out = torch.randn(3, 4, 6, generator=gen).to(dtype)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, float("nan"), 0.0]).to(dtype)
    padded = ~mask.expand(x.shape)
    clean = _outputs_and_grads(x.masked_fill(padded, 0), mask, weight, bias, grad_out.masked_fill(padded, 0),
                               center=center, masked=masked)
    x_g, g_g = torch.where(padded, garbage, x), torch.where(padded, garbage.flip(0), grad_out)
    dirty = _outputs_and_grads(x_g, mask, weight, bias, g_g, center=center, masked=masked)
    valid = mask.expand(x.shape)
    for a, b in zip(clean[:2], dirty[:2]):
        assert torch.equal(a[valid].view(torch.int16 if dtype.itemsize == 2 else a.dtype),
                           b[valid].view(torch.int16 if dtype.itemsize == 2 else b.dtype))
    for a, b in zip(clean[2:], dirty[2:]):
        assert torch.equal(a, b)
    zero = masked == "zero"
    for got, passed in ((dirty[0], x_g), (dirty[1], g_g)):
        expected = torch.zeros_like(passed) if zero else passed
        assert torch.equal(got[padded].isnan(), expected[padded].isnan())
        assert torch.equal(got[padded].nan_to_num(), expected[padded].nan_to_num())


@needs_triton
@dtypes
def test_degenerate_rows_pass_through(dtype):
    """Rows whose valid values are all equal with eps = 0, and every row when correction >= D, come
    out as x and take the upstream gradient unchanged, with no affine and no NaN. (Seven 0.1s: their
    plain mean is not 0.1 in float32 or float64, so only the shift by the first value makes their
    spread exactly 0.)"""
    x = torch.tensor([[[0.1] * 7, [0.0] * 7, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]]).to(dtype)
    weight, bias = torch.full((7,), 3.0, dtype=dtype), torch.ones(7, dtype=dtype)
    grad_out = torch.randn(1, 3, 7).to(dtype)
    for center in (True, False):
        out, gx, gw, gb = _outputs_and_grads(x, None, weight, bias, grad_out, eps=0.0, center=center)
        constant = [0, 1] if center else [1]
        assert torch.equal(out[0, constant], x[0, constant]) and torch.equal(gx[0, constant], grad_out[0, constant])
        assert not torch.equal(out[0, 2], x[0, 2]) and torch.isfinite(gw).all() and torch.isfinite(gb).all()
        out, gx, gw, gb = _outputs_and_grads(x, None, weight, bias, grad_out, correction=7, center=center)
        assert torch.equal(out, x) and torch.equal(gx, grad_out)
        assert not gw.any() and not gb.any()


@needs_triton
@pytest.mark.parametrize("masked", POLICIES)
@pytest.mark.parametrize("center", [True, False], ids=["center", "rms"])
def test_gradcheck_float64(center, masked):
    """torch.autograd.gradcheck (first order on the kernels) and gradgradcheck (the general closed
    form) in float64, with a padded token and weight and bias."""
    gen = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in ((2, 3, 4), (4,), (4,)))
    mask = torch.tensor([[True, False, True], [True, True, True]]).unsqueeze(-1)

    def fn(x, w, b):
        return on_triton(x, mask, -1, weight=w, bias=b, center=center, masked=masked, correction=1)

    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x, w, b), fast_mode=True)


@needs_triton
def test_unsupported_calls_raise():
    """backend="triton" never falls back: a layout the kernels do not run (a reduction that is neither
    trailing nor every axis but 1, weight varying where the groups are kept apart, a non-channel
    weight in batch norm), a traced call and an unknown backend raise ValueError saying why."""
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="reduces axes \\(0,\\) of a 3-d x"):
        on_triton(x, None, 0)
    with pytest.raises(ValueError, match="weight or bias varies along kept axes \\(1,\\) while the mask"):
        on_triton(x, torch.rand(2, 3, 4) > 0.5, -1, weight=torch.ones(3, 4))
    with pytest.raises(ValueError, match="over every axis but 1 the kernels take them per channel"):
        on_triton(x, None, (0, 2), weight=torch.ones(3, 4))
    with pytest.raises(ValueError, match="eager mode"):
        torch.func.vmap(lambda t: on_triton(t, None, -1))(x)
    with pytest.raises(ValueError, match="backend must be one of"):
        masknorm.masked_norm(x, backend="cuda")


@needs_triton
def test_weight_broadcast_along_normalized_axes():
    """weight of shape (1, 4) and bias of shape (4,) over (2, 3, 4) reduced over the last two axes:
    the same output and gradients (in their own shapes) as the general path, to rounding."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    w, b = torch.randn(1, 4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    mask, g = torch.tensor([True, False]).reshape(2, 1, 1), torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    results = []
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out = masknorm.masked_norm(leaves[0], mask, (1, 2), weight=leaves[1], bias=leaves[2], backend=backend)
        results.append((out, *torch.autograd.grad(out, leaves, g)))
    for a, b in zip(*results):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-13, atol=1e-13)


@needs_triton
def test_verify_backend_triton(capsys):
    """`masknorm verify --backend triton` runs every family's cases through the kernels (layer and
    RMS on the padded-token kernels, batch, group and instance norm on the group kernels) within the
    bounds, lists weight_norm as skipped and prints the worst errors per dtype."""
    from masknorm_cli import verify

    assert verify.main(["--backend", "triton", "--skip-derive"]) == 0
    out = capsys.readouterr().out
    assert "skipped: not a normalization the kernels run" in out
    for dtype in ("float64", "float32", "bfloat16", "float16"):
        assert f"  {dtype:<9} forward " in out and "over 18 cases" in out
    assert "72 passed, 0 failed, 1 skipped" in out
