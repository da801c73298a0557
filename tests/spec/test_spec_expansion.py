"""The generic closed forms against explicit expansion for n = 1..8 (concrete masks)."""

import dataclasses

import pytest

from masknorm.spec import expansion
from masknorm.spec.definitions import concrete_masks, k, nu
from masknorm.spec.derivation import DerivationError, form


@pytest.mark.parametrize("size", expansion.SIZES)
def test_generic_closed_forms_equal_the_expansion(size):
    result = expansion.expand_size(size)
    assert result.masks == tuple(concrete_masks(size))
    # per mask and variant: n^2 Jacobian entries, and per policy 4 identities per position
    assert result.identities == len(result.masks) * 2 * (size * size + 3 * 4 * size)


def test_masks_include_single_valid_and_masked_out_positions():
    masks = concrete_masks(5)
    assert (1, 0, 0, 0, 0) in masks and (0, 0, 0, 0, 1) in masks and (1, 0, 1, 0, 1) in masks
    assert all(any(mask) for mask in masks)
    assert concrete_masks(1) == [(1,)]


@pytest.mark.parametrize("name,replace", [
    ("jacobian_centered", {nu: k}),
    ("jacobian_rms", {nu: -nu}),
    ("vjp_centered", {k: nu}),
    ("jvp_centered", {k: nu}),
    ("vjp_rms", {nu: k}),
    ("jvp_rms", {nu: -nu}),
    ("weight_grad", {"negate": True}),
    ("affine_jvp", {"negate": True}),
])
def test_expansion_rejects_a_wrong_closed_form(monkeypatch, name, replace):
    right = form(name)
    expr = -right.expr if "negate" in replace else right.expr.xreplace(replace)
    wrong = dataclasses.replace(right, expr=expr)
    monkeypatch.setattr(expansion, "form", lambda n: wrong if n == name else form(n))
    with pytest.raises(DerivationError):
        expansion.confirm((1, 0, 1), not name.endswith("_rms"))

