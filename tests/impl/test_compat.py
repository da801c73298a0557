"""masknorm.compat against algmarques/masked_norm's documented behaviour: its own hand-computed cases
(from that library's test suite), unbiased variance without eps, rows selected by the mask, constant
rows passed through, per-row affine applied to every row, the batched variants, and the lazy modules."""

import pytest
import torch

from masknorm.compat import (
    LazyAffineMaskedNorm, LazyMaskedNorm, MaskedNorm, affine_masked_norm, batched_affine_masked_norm,
    batched_masked_norm, masked_norm,
)

X3 = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], [[6.0, 7.0, 8.0], [0.0, 0.0, 0.0]]])
M2 = torch.tensor([[True, True], [True, False]])
ROW = [-1.0, 0.0, 1.0]


def test_upstream_cases_plain():
    assert torch.equal(masked_norm(torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])), torch.tensor([ROW, ROW]))
    zero_row = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    assert torch.equal(masked_norm(zero_row), torch.tensor([ROW, [0.0, 0.0, 0.0]]))
    assert torch.equal(masked_norm(zero_row, torch.tensor([True, False])), torch.tensor([ROW, [0.0, 0.0, 0.0]]))
    assert torch.equal(masked_norm(X3, M2), torch.tensor([[ROW, ROW], [ROW, [0.0, 0.0, 0.0]]]))


def test_upstream_cases_affine():
    x = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    w = torch.tensor([2.0, 1.0])
    assert torch.equal(affine_masked_norm(x, None, w, None), torch.tensor([[-2.0, 0.0, 2.0], ROW]))
    assert torch.equal(affine_masked_norm(x, None, w, torch.tensor([1.0, 1.0])), torch.tensor([[-1.0, 1.0, 3.0], [0.0, 1.0, 2.0]]))
    zero_row = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    out = affine_masked_norm(zero_row, torch.tensor([True, False]), w, torch.tensor([1.0, 1.0]))
    assert torch.equal(out, torch.tensor([[-1.0, 1.0, 3.0], [1.0, 1.0, 1.0]]))  # affine reaches the passed-through row
    w2, b2 = torch.tensor([[2.0, 1.0], [3.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    expected = torch.tensor([[[-2.0, 0.0, 2.0], [0.0, 1.0, 2.0]], [[-1.0, 2.0, 5.0], [-1.0, -1.0, -1.0]]])
    assert torch.equal(affine_masked_norm(X3, M2, w2, b2), expected)


def test_unselected_rows_pass_through_whatever_they_hold_and_variance_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=gen) > 0.4
    out = masked_norm(x, mask)
    assert torch.equal(out[~mask], x[~mask])
    rows = x[mask]
    expected = (rows - rows.mean(-1, keepdim=True)) / rows.std(-1, keepdim=True)  # std: divisor n - 1, no eps
    torch.testing.assert_close(out[mask], expected)
    prefix = torch.tensor([True, False, True, True])  # a mask over a prefix of the row axes
    torch.testing.assert_close(masked_norm(x, prefix), masked_norm(x, prefix[:, None].expand(4, 5)))


def test_batched_normalizes_along_the_first_axis():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, 4, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 4, generator=gen) > 0.3
    w, b = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(3, 4, generator=gen, dtype=torch.float64)
    moved = x.permute(1, 2, 0)
    torch.testing.assert_close(batched_masked_norm(x, mask), masked_norm(moved, mask).permute(2, 0, 1))
    torch.testing.assert_close(batched_affine_masked_norm(x, mask, w, b),
                               affine_masked_norm(moved, mask, w, b).permute(2, 0, 1))
    expected = (x - x.mean(0)) / x.std(0)
    torch.testing.assert_close(batched_masked_norm(x, None), expected)


def test_gradients_flow_through_selected_rows_only():
    x = X3.clone().double().requires_grad_(True)
    masked_norm(x, M2).sum().backward()
    assert torch.equal(x.grad[1, 1], torch.ones(3, dtype=torch.float64))  # pass-through: identity
    torch.testing.assert_close(x.grad[0], torch.zeros(2, 3, dtype=torch.float64))  # sum of a normalized row is constant


def test_modules_and_lazy_shapes():
    assert torch.equal(MaskedNorm()(X3, M2), masked_norm(X3, M2))
    assert torch.equal(MaskedNorm(batched=True)(X3), batched_masked_norm(X3, None))
    assert torch.equal(LazyMaskedNorm()(X3, M2), masked_norm(X3, M2))
    lazy = LazyAffineMaskedNorm()
    assert lazy.has_uninitialized_params()
    out = lazy(X3, M2)
    assert lazy.weight.shape == M2.shape and torch.equal(lazy.weight, torch.ones(2, 2))
    assert torch.equal(lazy.bias, torch.zeros(2, 2)) and torch.equal(out, masked_norm(X3, M2))
    assert LazyAffineMaskedNorm()(X3).shape == X3.shape
    batched = LazyAffineMaskedNorm(batched=True, dtype=torch.float64)
    batched(X3.double())
    assert batched.weight.shape == (2, 3) and batched.weight.dtype == torch.float64
    with torch.no_grad():
        lazy.weight.fill_(2.0)
    assert torch.equal(lazy(X3, M2), 2 * masked_norm(X3, M2))


def test_errors():
    with pytest.raises(ValueError, match="bool"):
        masked_norm(X3, M2.float())
    with pytest.raises(ValueError, match=r"'mask' of shape \(2, 3\) must match inpt.shape\[:-1\] = \(2, 2\)"):
        masked_norm(X3, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="'weight' of shape"):
        affine_masked_norm(X3, None, torch.ones(3), None)
    with pytest.raises(ValueError, match="same shape as 'mask'"):
        affine_masked_norm(X3, M2, torch.ones(2), None)


def test_the_seeds_own_cases_that_failed_here():
    """From algmarques/masked_norm's test suite: the empty tensor, and a lazy module's parameters
    read after calling layer.forward directly (torch's lazy pre-forward hook does not run then)."""
    empty = torch.tensor([])
    assert masked_norm(empty).shape == empty.shape
    x = torch.tensor([[1.0, 2.0, 4.0], [3.0, 5.0, 7.0]])  # two rows: weight and bias have one entry per row
    for mask, shape in ((None, (2,)), (torch.tensor([True, False]), (2,))):
        layer = LazyAffineMaskedNorm()
        layer.forward(x, mask)
        assert layer.weight.shape == shape and layer.bias.shape == shape
        torch.testing.assert_close(layer.weight, torch.ones(shape))
