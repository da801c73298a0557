"""The padded-token path's bookkeeping of padded rows: a few runs of rows are copied as slices,
many as an index; both must touch exactly the padded rows and give the same bits."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from masknorm import masked_norm
from masknorm._token_path import PaddedRows


def _runs(valid):
    """The number of maximal runs of False in `valid`, counted in plain Python."""
    return sum(1 for i, v in enumerate(valid) if not v and (i == 0 or valid[i - 1]))


@given(valid=st.lists(st.booleans(), min_size=1, max_size=300))
def test_padded_rows_touch_exactly_the_padded_rows(valid):
    v = torch.tensor(valid)
    rows = PaddedRows(v)
    assert (rows.runs is not None) == (0 < _runs(valid) <= PaddedRows.MAX_RUNS)
    src = torch.arange(3.0 * len(valid)).reshape(-1, 3)
    dst = torch.full_like(src, -1.0)
    rows.copy_(dst, src)
    assert torch.equal(dst, torch.where(v[:, None], -1.0, src))
    rows.zero_(dst)
    assert torch.equal(dst, torch.where(v[:, None], -1.0, torch.zeros_like(dst)))
    assert torch.equal(rows.rows, torch.tensor([i for i, ok in enumerate(valid) if ok], dtype=torch.long))


@pytest.mark.parametrize("masked", ["normalize", "keep", "zero"])
def test_slices_and_index_give_the_same_bits(masked, monkeypatch):
    """Every other token padded (150 runs: the index) against the same call with runs allowed."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 150, 16, generator=gen, dtype=torch.float64)
    mask = (torch.arange(150) % 2 == 0).reshape(1, 150, 1).expand(2, 150, 1)
    weight, bias = torch.randn(16, generator=gen, dtype=torch.float64), torch.randn(16, generator=gen, dtype=torch.float64)
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = masked_norm(leaves[0], mask, -1, weight=leaves[1], bias=leaves[2], masked=masked)
        return (out, *torch.autograd.grad(out, leaves, g))

    assert PaddedRows(mask.flatten()).runs is None
    by_index = run()
    monkeypatch.setattr(PaddedRows, "MAX_RUNS", 10**9)
    assert PaddedRows(mask.flatten()).runs is not None
    for a, b in zip(run(), by_index):
        assert torch.equal(a, b)
