"""The oracle's pieces on hand-made inputs: error metrics, exact literals, strategies' promises,
Semantics validation, and `masknorm verify` judging through the shared comparison code."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st

import masknorm.reference.verify as verify
from masknorm.reference.oracle.compare import forward_error, inverse_s, normwise_error
from masknorm.reference.oracle.frameworks import Framework
from masknorm.reference.oracle.properties import Caller, measure_forward
from masknorm.reference.oracle.report import comment, import_code, literal
from masknorm.reference.oracle.strategies import bucket_shapes, with_min_valid
from masknorm.testing import MaskedInput, Semantics, masked_inputs, upstream_gradients

U64 = 2.0**-53


def test_forward_error_in_ukappa_by_hand():
    y_ref = np.array([1.0, 2.0, 0.0])
    kap = np.array([1.0, 4.0, 1.0])
    y = y_ref + np.array([2 * U64, 16 * U64, 0.0])  # one ulp above 1, four above 2
    assert forward_error(y, y_ref, kap, dtype="float64") == 4.0
    assert forward_error(y, y_ref, kap, dtype="float64", where=np.array([True, False, True])) == 2.0


def test_forward_error_is_inf_when_finiteness_differs_and_ignores_garbage_outside_where():
    y_ref = np.array([1.0, np.nan])
    assert forward_error(np.array([np.nan, np.nan]), y_ref, np.ones(2), dtype="float64") == math.inf
    assert forward_error(np.array([1.0, 5.0]), y_ref, np.ones(2), dtype="float64") == math.inf
    assert forward_error(np.array([1.0, 5.0]), y_ref, np.ones(2), dtype="float64", where=np.array([True, False])) == 0.0


def test_normwise_error_per_group():
    want = np.array([[1.0, -2.0], [0.0, 0.0]])
    got = want + np.array([[2 * U64, 0.0], [0.0, 0.0]])
    size = np.abs(want)
    assert normwise_error(got, want, size, U64, (1,)) == 1.0  # |delta| / (u * max|want|) = 2u / 2u
    got[1, 0] = 1e-300  # an error where the true gradient and its size are exactly 0
    assert normwise_error(got, want, size, U64, (1,)) == math.inf
    got[1, 0] = np.nan
    assert normwise_error(got, want, size + 1, U64, (1,)) == math.inf


def test_inverse_s_is_zero_exactly_on_degenerate_groups():
    x = np.array([[1.0, 3.0], [2.0, 2.0], [5.0, 7.0]])
    mask = np.array([[True, True], [True, True], [False, False]])
    inv = inverse_s(x, mask, -1, correction=0, eps=0.0, center=True)
    np.testing.assert_allclose(inv[0], [1.0, 1.0])  # mu = 2, sigma = 1
    np.testing.assert_array_equal(inv[1:], 0.0)  # constant with eps = 0, and empty


def test_literals_rebuild_tensors_exactly():
    x = torch.tensor([[0.1, -3.0e38, float("nan")], [float("inf"), -float("inf"), 1.4e-45]], dtype=torch.float32)
    namespace = {"torch": torch}
    exec(Framework().code("y", literal(x.double()), "float32", grad=True), namespace)  # noqa: S102
    y = namespace["y"]
    assert y.dtype == torch.float32 and y.requires_grad
    torch.testing.assert_close(y.detach(), x, rtol=0, atol=0, equal_nan=True)
    assert literal(torch.tensor([True, False])) == "[True, False]"


@settings(max_examples=30, deadline=None)
@given(masked_inputs((0, 2), ndim=3, mask_dims=(0,), garbage=True, dtype="float32"))
def test_masks_vary_only_along_mask_dims_and_garbage_only_in_padding(inp):
    assert inp.mask.shape == (inp.x.shape[0], 1, 1) and inp.mask.dtype == torch.bool
    assert inp.x.dtype == torch.float32 and inp.dims == (0, 2)
    assert torch.isfinite(inp.x[inp.valid]).all()


def test_strategies_reach_the_edge_cases():
    def groups(inp):
        return inp.valid.sum(-1)

    degenerate = masked_inputs(-1, ndim=2, degenerate=True)
    assert find(degenerate, lambda i: (groups(i) == 0).any() and (groups(i) == 1).any() and i.x.shape[-1] > 1)
    assert find(degenerate, lambda i: i.x.shape[-1] > 1 and bool((i.x == i.x[..., :1]).all(-1).any()))
    assert find(masked_inputs(-1, garbage=True), lambda i: bool(torch.isnan(i.x).any() and torch.isinf(i.x).any()))
    big = find(masked_inputs(-1, dtype="float32", extreme=True), lambda i: bool(i.x.abs().max() > 1e37))
    assert torch.isfinite(big.x).all()
    small = find(masked_inputs(-1, dtype="float32", extreme=True), lambda i: bool(((i.x != 0) & (i.x.abs() < 1e-38)).any()))
    assert small.x.abs().max() < 1e-37
    assert find(masked_inputs(-1), lambda i: bool(i.x.abs().min() > 1e5 * i.x.std(-1, unbiased=False).max() > 0))


@settings(max_examples=20, deadline=None)
@given(st.data())
def test_upstream_gradients_are_zero_in_padding_on_request(data):
    inp = data.draw(masked_inputs(-1, garbage=True))
    grad = data.draw(upstream_gradients(inp, zero_padding=True))
    assert grad.shape == inp.x.shape and (grad[~inp.valid] == 0).all()


@settings(max_examples=30, deadline=None)
@given(masked_inputs((0, 2), ndim=3, mask_dims=(0, 2), padded=True, degenerate=True))
def test_padded_inputs_have_a_masked_out_position(inp):
    assert not inp.valid.all()


def test_bucket_shapes_are_few_and_keep_min_group_size():
    assert bucket_shapes(2, (1,)) == ((6, 1), (3, 3), (6, 6))
    assert bucket_shapes(3, (0, 2), min_group_size=3, sides=(None, 2, (2, 3))) == ((2, 2, 2), (4, 2, 3))
    with pytest.raises(ValueError, match="groups of 9"):
        bucket_shapes(1, (0,), min_group_size=9)


@settings(max_examples=30, deadline=None)
@given(masked_inputs(-1, shape_buckets=True))
def test_bucketed_inputs_draw_only_bucket_shapes(inp):
    rank = inp.x.dim()
    assert tuple(inp.x.shape) in bucket_shapes(rank, (rank - 1,))


@settings(max_examples=40, deadline=None)
@given(masked_inputs((0, 2), ndim=3, mask_dims=(0, 2), min_valid=2, degenerate=True, padded=True))
def test_min_valid_holds_in_every_group_even_for_degenerate_masks(inp):
    assert (inp.valid.sum((0, 2)) >= 2).all()


def test_with_min_valid_turns_on_only_what_a_short_group_needs():
    mask = torch.tensor([[False, False, False], [True, True, False]])  # (2, 3), groups are rows
    assert with_min_valid(mask, (2, 3), (1,), 2).tolist() == [[True, True, False], [True, True, False]]
    # a mask of size 1 along the reduced axis: one entry covers a whole row, which is all it can hold
    assert with_min_valid(torch.tensor([[False], [True]]), (2, 3), (1,), 5).tolist() == [[True], [True]]
    assert with_min_valid(mask, (2, 3), (1,), 0) is mask


def test_no_mask_means_no_mask_and_min_group_size_holds():
    inp = find(masked_inputs((0, 2), ndim=3, mask=False, min_group_size=2), lambda i: True)
    assert inp.mask is None and inp.x.shape[0] * inp.x.shape[2] >= 2


@pytest.mark.parametrize(
    "kwargs, error",
    [(dict(dim=()), ValueError), (dict(dim=1.5), TypeError), (dict(eps=-1.0), ValueError),
     (dict(correction=-1), ValueError), (dict(masked="drop"), ValueError), (dict(center=1), TypeError)],
)
def test_semantics_rejects_what_masked_norm_rejects(kwargs, error):
    with pytest.raises(error):
        Semantics(**kwargs)


def test_semantics_accepts_lists_of_axes():
    assert Semantics([0, 2]).dim == (0, 2)


def test_verify_fails_a_broken_layer_through_the_shared_comparison(monkeypatch):
    family = verify.FAMILIES[0]
    assert verify.check_case(family, "normalize", torch.float64, 0).passed

    right = verify.masked_norm

    def no_eps(x, mask, dims, **kw):
        return right(x, mask, dims, **dict(kw, eps=0.0))

    monkeypatch.setattr(verify, "masked_norm", no_eps)
    row = verify.check_case(family, "normalize", torch.float64, 0)
    assert not row.passed and row.forward > verify.FORWARD_BOUND


def test_import_masknorm_does_not_import_the_oracle_dependencies():
    code = (
        "import sys, masknorm; assert not {'hypothesis', 'mpmath'} & set(sys.modules), sorted(sys.modules);"
        "import masknorm.testing; assert {'hypothesis', 'mpmath'} <= set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_output_beyond_the_dtype_range_is_right_as_inf():
    x = torch.tensor([[4.0e37, 0.0]], dtype=torch.float32)  # masked-out output -4e37/sqrt(1e-5) ~ -1.3e40
    inp = MaskedInput(x, torch.tensor([[True, False]]), (1,))
    rounded = torch.tensor([[0.0, -math.inf]], dtype=torch.float32)
    assert measure_forward(Caller(lambda x, m: rounded, Framework()), Semantics(-1), inp).problem is None
    saturated = torch.tensor([[0.0, -torch.finfo(torch.float32).max]], dtype=torch.float32)
    outcome = measure_forward(Caller(lambda x, m: saturated, Framework()), Semantics(-1), inp)
    assert outcome.problem == "finite output where the reference is NaN or Inf"


def test_a_multi_line_message_is_commented_on_every_line():
    """Defect found on Keras: its exception messages span lines and carry terminal colours."""
    lines = comment("IndexError: tuple index out of range\n\x1b[1mArguments received by\x1b[0m:\n  inputs=x")
    assert lines == ["# IndexError: tuple index out of range", "# Arguments received by:", "#   inputs=x"]


def test_import_code_puts_the_target_s_folder_on_the_path_only_where_needed(tmp_path, monkeypatch):
    (tmp_path / "pkg_i27").mkdir()
    (tmp_path / "pkg_i27" / "__init__.py").write_text("")
    (tmp_path / "pkg_i27" / "norms.py").write_text("class Norm:\n    @staticmethod\n    def apply(x):\n        return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("pkg_i27.norms")
    try:
        code = import_code("pkg_i27.norms:Norm.apply")
    finally:
        for name in ("pkg_i27.norms", "pkg_i27"):
            sys.modules.pop(name, None)
    assert code.splitlines() == [
        "import sys",
        f"sys.path.insert(0, {str(tmp_path)!r})  # where pkg_i27.norms was imported from by the check",
        "from pkg_i27.norms import Norm",
        "fn = Norm.apply",
    ]
    assert import_code("numpy.linalg:norm") == "from numpy.linalg import norm as fn"  # installed: importable anywhere
    assert import_code("__main__:fn").startswith("fn = ...")
    assert import_code("mod:outer.<locals>.fn").startswith("fn = ...")
