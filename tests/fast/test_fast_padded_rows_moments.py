"""The padded-rows kernel's row statistics (kernels/padded_rows.cpp's moments): float32, float16 and bfloat16 rows
take one pass shifted by the row's first value, guarded by a test that sends rows where it could lose digits
to two passes. Whichever branch a row takes, its mean and rstd must be float64's rounded to the statistics'
type (within one ulp: a tie may round either way); the result must not depend on the thread count; and a
padded row's garbage must leave every other value with the bits of clean padding."""

import pytest
import torch

from masknorm.fast import native

pytestmark = pytest.mark.skipif(native.ops() is None, reason="the fused CPU kernels could not be built")


OFFSET = {torch.float32: 1e5, torch.float16: 256.0, torch.bfloat16: 16.0, torch.float64: 1e5}


def _rows(dtype, n, gen):
    """Rows for each branch of the statistics: plain, a large mean against sigma (kappa ~ 1e5 in float32: the shift
    keeps it exact; one pass about 0 would be off by several ulps), a first value far out (S2/ss ~ 1 + n: with
    n = 8192, (kBlock + n/kBlock) S2 ~ 2^21 ss, so the guard sends the row to two passes), and a constant row
    (ss = 0 exactly)."""
    plain = torch.randn(4, n, generator=gen, dtype=torch.float64)
    offset = OFFSET[dtype] + torch.randn(4, n, generator=gen, dtype=torch.float64)
    outlier = torch.randn(4, n, generator=gen, dtype=torch.float64)
    outlier[:, 0] = 1e4
    constant = torch.full((2, n), 3.25, dtype=torch.float64)
    return torch.cat([plain, offset, outlier, constant]).to(dtype)


def _check_statistics(x, eps=1e-5):
    """mean and rstd of the kernel within one ulp (of the statistics' type) of float64's."""
    _, mean, rstd, flagged = native.ops().padded_rows_norm(x, None, None, None, 1, eps, True, False)
    assert int(flagged) == 0
    x64 = x.double()
    mu = x64.mean(1, keepdim=True)
    r = 1.0 / torch.sqrt(((x64 - mu) ** 2).mean(1, keepdim=True) + eps)
    for got, want in ((mean, mu), (rstd, r)):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=torch.finfo(got.dtype).eps, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [2, 7, 768, 8192])
def test_row_statistics_are_float64s_rounded(dtype, n):
    _check_statistics(_rows(dtype, n, torch.Generator().manual_seed(n)))


def _call(x, mask, w, b, dy, zero):
    ops = native.ops()
    y, mean, rstd, flagged = ops.padded_rows_norm(x, mask, w, b, 1, 1e-5, True, zero)
    return (y, mean, rstd, flagged, *ops.padded_rows_norm_backward(dy, x, mask, mean, rstd, w, 1, True, zero))


def _same_bits(a, b):
    for s, t in zip(a, b):
        torch.testing.assert_close(s, t, rtol=0, atol=0, equal_nan=True)


def _case(dtype, gen, copies=3, n=8192):
    """More rows than one thread's share (32768 / n rows), each branch of the statistics among them, a third
    padded."""
    x = torch.cat([_rows(dtype, n, gen)] * copies)
    mask = torch.rand(x.shape[0], 1, generator=gen) > 0.33
    w, b = (torch.randn(n, generator=gen).to(dtype) for _ in range(2))
    return x, mask, w, b, torch.randn(x.shape, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_statistics_and_gradients_do_not_depend_on_the_thread_count(dtype):
    args = _case(dtype, torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _call(*args, False)
        torch.set_num_threads(2)
        two = _call(*args, False)
    finally:
        torch.set_num_threads(threads)
    _same_bits(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("zero", [False, True], ids=["pass-through", "zero"])
def test_garbage_in_padded_rows_gives_the_bits_of_clean_padding(dtype, zero):
    x, mask, w, b, dy = _case(dtype, torch.Generator().manual_seed(2))
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e38, -3e38]).to(dtype)
    pick = torch.randint(0, 5, x.shape, generator=torch.Generator().manual_seed(3))
    x_dirty, dy_dirty = torch.where(mask, x, garbage[pick]), torch.where(mask, dy, garbage[pick.flip(0)])
    clean = _call(x.masked_fill(~mask, 0), mask, w, b, dy.masked_fill(~mask, 0), zero)
    dirty = _call(x_dirty, mask, w, b, dy_dirty, zero)
    pad = ~mask.expand_as(x)
    for out, src in ((dirty[0], x_dirty), (dirty[4], dy_dirty)):  # y and dx: a padded row passes through, or is 0
        _same_bits([out[pad]], [(torch.zeros_like(src) if zero else src)[pad]])
    _same_bits([clean[0][~pad], clean[4][~pad], *clean[1:4], *clean[5:]],
               [dirty[0][~pad], dirty[4][~pad], *dirty[1:4], *dirty[5:]])
