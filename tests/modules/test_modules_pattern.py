"""The einops-style pattern parser: what it accepts, how it splits shapes, and errors that name the culprit."""

import pytest

from masknorm.modules._pattern import ELLIPSIS, check_sizes, parse_axes, parse_pattern, resolve


def test_parse_names_composites_units_and_ellipsis():
    p = parse_pattern(" b  (g c) () t ... ")
    assert p.groups == (("b",), ("g", "c"), (), ("t",), (ELLIPSIS,))
    assert p.names == ("b", "g", "c", "t") and p.has_ellipsis
    assert not parse_pattern("b n d").has_ellipsis


@pytest.mark.parametrize("text, culprit", [
    ("b ((c))", "nested"), ("b c)", "')'"), ("(b c", "'('"), ("b n b", "'b' appears twice"),
    ("b (n b)", "'b' appears twice"), ("2b c", "'2b'"), ("b-c", "'b-c'"), ("... c ...", "only once"),
    ("b (... c)", "inside parentheses"), ("", "empty"), ("   ", "empty"),
])
def test_parse_errors_name_the_token(text, culprit):
    with pytest.raises(ValueError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
        parse_pattern(text)


def test_parse_axes_checks_membership_and_repeats():
    p = parse_pattern("b (g c) t")
    assert parse_axes("c  t", p, "reduce") == ("c", "t")
    assert parse_axes("", p, "features") == ()
    with pytest.raises(ValueError, match=r"reduce='c x': axis 'x' is not an axis of pattern 'b \(g c\) t'"):
        parse_axes("c x", p, "reduce")
    with pytest.raises(ValueError, match="axis 't' appears twice"):
        parse_axes("t c t", p, "features")
    with pytest.raises(TypeError):
        parse_axes(["t"], p, "reduce")


def test_sizes_must_name_axes_and_be_positive_ints():
    p = parse_pattern("b n d")
    assert check_sizes(p, {"d": 4}) == {"d": 4}
    with pytest.raises(ValueError, match="'q' is not an axis"):
        check_sizes(p, {"q": 4})
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="axis 'd'"):
            check_sizes(p, {"d": bad})


def test_resolve_splits_and_infers():
    p = parse_pattern("b (g c) t")
    layout = resolve(p, (2, 12, 5), {"g": 3})
    assert layout.names == ("b", "g", "c", "t") and layout.shape == (2, 3, 4, 5)
    assert layout.split == ((2,), (3, 4), (5,))
    assert layout.positions(("t", "g")) == (3, 1)
    assert resolve(parse_pattern("b () d"), (2, 1, 3)).shape == (2, 3)


def test_resolve_expands_the_ellipsis():
    p = parse_pattern("b ... d")
    assert resolve(p, (2, 3, 4, 5)).names == ("b", ELLIPSIS, ELLIPSIS, "d")
    assert resolve(p, (2, 5)).shape == (2, 5)


@pytest.mark.parametrize("pattern, shape, sizes, message", [
    ("b n d", (2, 3), {}, r"needs 3 dimensions, but x has shape \(2, 3\)"),
    ("b ... n d", (2, 3), {}, "needs at least 3 dimensions"),
    ("b n d", (2, 3, 4), {"d": 5}, "axis d has size d=5 = 5 but x has size 4 at dimension 2"),
    ("b (g c) t", (2, 12, 5), {}, "cannot infer the sizes of g, c in \\(g c\\)"),
    ("b (g c) t", (2, 12, 5), {"g": 5}, "size 12 at dimension 1 is not divisible .* so 'c' cannot be inferred"),
    ("b (g c) t", (2, 12, 5), {"g": 2, "c": 5}, "axis \\(g c\\) has size g=2 \\* c=5 = 10 but x has size 12"),
    ("b () t", (2, 3, 5), {}, "axis \\(\\) has size \\(\\) = 1 but x has size 3 at dimension 1"),
])
def test_resolve_errors_name_axis_and_size(pattern, shape, sizes, message):
    with pytest.raises(ValueError, match=message):
        resolve(parse_pattern(pattern), shape, sizes)
