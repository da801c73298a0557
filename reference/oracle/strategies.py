"""Hypothesis strategies for masked-normalization inputs, for masknorm's oracle and other test suites.

    x = (offset + z) * scale rounded once to the dtype, z in [-1, 1], |offset| up to 1e6 (kappa ~ |offset|);
    mask: bool, x's rank, size 1 on the axes it does not vary along

Edge cases on request: all-masked groups, one valid element, constant groups (`degenerate`), at
least one masked-out position (`padded`); a floor on the valid positions of every group
(`min_valid`, for implementations that refuse smaller groups, e.g. torch's batch norm in training); NaN, +-Inf and the dtype's largest value at masked-out
positions (`garbage`), and values at the dtype's overflow and underflow thresholds (`extreme`).
Shapes: any within the sides' ranges, or with `shape_buckets` only the few of bucket_shapes (for
frameworks that compile per shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from hypothesis import strategies as st

from masknorm._contract import normalize_dims

Dim = Union[int, Sequence[int]]
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Largest side per rank, so that a drawn x holds at most ~64 values (the reference is mpmath).
MAX_SIDE = {1: 8, 2: 6, 3: 4, 4: 3}
# Powers of ten for |offset| (kappa ~ 10^k) and for the scale, per dtype: offset + scale stays finite
# and keeps some precision (bfloat16 has 8 bits, float16 overflows at 65504).
OFFSET_EXP = {torch.float64: 6, torch.float32: 6, torch.bfloat16: 2, torch.float16: 3}
SCALE_EXP = {torch.float64: (-3, 3), torch.float32: (-3, 3), torch.bfloat16: (-2, 2), torch.float16: (-1, 1)}
EXTREME_OFFSETS = (0.0, 1.0, -1.0, 4.0, -4.0)


@dataclass(frozen=True)
class MaskedInput:
    """One drawn call: x, its mask (None when the implementation takes none) and the reduced axes."""

    x: torch.Tensor
    mask: Optional[torch.Tensor]
    dims: Tuple[int, ...]

    @property
    def valid(self) -> torch.Tensor:
        """The mask broadcast to x's shape (all True without a mask)."""
        if self.mask is None:
            return torch.ones(self.x.shape, dtype=torch.bool)
        return self.mask.expand(self.x.shape)


def ranks(dim: Dim, ndim: Optional[int], mask_dims: Optional[Dim]) -> Tuple[int, ...]:
    """The ranks x may have: `ndim`, or every rank up to max(3, the least) for which dim and mask_dims
    name valid axes. ValueError when there is none."""
    candidates = (ndim,) if ndim is not None else tuple(range(1, 5))
    ok = []
    for n in candidates:
        try:
            normalize_dims(dim, n)
            if mask_dims is not None:
                normalize_dims(mask_dims, n)
        except ValueError:
            continue
        ok.append(n)
    if not ok:
        raise ValueError(f"no rank {'' if ndim is None else ndim} fits dim={dim!r} and mask_dims={mask_dims!r}")
    return tuple(n for n in ok if n <= max(3, ok[0]))


Sides = Optional[Sequence[Optional[Union[int, Tuple[int, int]]]]]


def side_ranges(rank: int, sides: Sides = None) -> Tuple[Tuple[int, int], ...]:
    """(low, high) of each axis: 1..MAX_SIDE[rank], or what `sides` fixes per axis (an int: that
    side; (low, high): that range; None: the default). ValueError naming the axis when a range is
    empty or `sides` does not have `rank` entries."""
    default = (1, MAX_SIDE.get(rank, 2))
    if sides is None:
        return (default,) * rank
    if len(sides) != rank:
        raise ValueError(f"sides has {len(sides)} entries, x has rank {rank}")
    ranges = []
    for axis, side in enumerate(sides):
        low, high = default if side is None else (side, side) if isinstance(side, int) else tuple(side)
        if not 1 <= low <= high:
            raise ValueError(f"sides[{axis}] = {side!r} is not a side >= 1 or a range 1 <= low <= high")
        ranges.append((low, high))
    return tuple(ranges)


@st.composite
def shapes(
    draw, rank: int, dims: Tuple[int, ...], min_group_size: int = 1, sides: Sides = None
) -> Tuple[int, ...]:
    """A shape of `rank` with sides in side_ranges(rank, sides) whose groups (the `dims` axes) hold
    at least `min_group_size` positions."""
    drawn = st.tuples(*[st.integers(low, high) for low, high in side_ranges(rank, sides)])
    return draw(drawn.filter(lambda s: math.prod(s[d] for d in dims) >= min_group_size))


def bucket_shapes(
    rank: int, dims: Tuple[int, ...], min_group_size: int = 1, sides: Sides = None
) -> Tuple[Tuple[int, ...], ...]:
    """The few shapes of `rank` drawn with shape_buckets, smallest first: every side at its
    smallest on the reduced axes and its largest elsewhere (the smallest groups, the most of
    them), every side in the middle of its range, every side at its largest; those whose groups
    hold fewer than `min_group_size` positions are left out. ValueError when none is left."""
    ranges = side_ranges(rank, sides)
    candidates = (
        tuple(low if d in dims else high for d, (low, high) in enumerate(ranges)),
        tuple((low + high) // 2 for low, high in ranges),
        tuple(high for _, high in ranges),
    )
    kept = [s for s in candidates if math.prod(s[d] for d in dims) >= min_group_size]
    if not kept:
        raise ValueError(f"no shape of rank {rank} within sides {sides!r} has groups of {min_group_size} positions")
    return tuple(sorted(set(kept), key=lambda s: (math.prod(s), s)))


def mask_shape(shape: Tuple[int, ...], mask_dims: Optional[Dim]) -> Tuple[int, ...]:
    """`shape` with size 1 on the axes not in `mask_dims` (None: the mask varies along every axis)."""
    varying = range(len(shape)) if mask_dims is None else normalize_dims(mask_dims, len(shape))
    return tuple(s if d in varying else 1 for d, s in enumerate(shape))


def _units(draw, count: int) -> list:
    """`count` draws in [0, 255], shrinking towards 0: one block of bytes, which hypothesis draws
    and shrinks ~6x faster than a list of as many separate choices (measured: 64 values)."""
    return list(draw(st.binary(min_size=count, max_size=count)))


def _floats(draw, shape: Tuple[int, ...]) -> torch.Tensor:
    """Values j/2^23 in (-1, 1) (exact in float32), three bytes each, shrinking towards 0."""
    raw = _units(draw, 3 * math.prod(shape))
    ints = [raw[i] << 16 | raw[i + 1] << 8 | raw[i + 2] for i in range(0, len(raw), 3)]
    drawn = [(n >> 1) / 2.0**23 * (-1.0 if n & 1 else 1.0) for n in ints]
    return torch.tensor(drawn, dtype=torch.float64).reshape(shape)


def _bools(draw, shape: Tuple[int, ...]) -> torch.Tensor:
    """Fair bools, shrinking towards False."""
    return torch.tensor([b >= 128 for b in _units(draw, math.prod(shape))], dtype=torch.bool).reshape(shape)


@st.composite
def values(
    draw,
    shape: Tuple[int, ...],
    dims: Tuple[int, ...],
    dtype: torch.dtype = torch.float64,
    *,
    constant_groups: bool = False,
    extreme: bool = False,
) -> torch.Tensor:
    """(offset + z) * scale in float64, rounded once to `dtype`; with `constant_groups` some groups
    hold one value throughout; `extreme` puts the scale at a quarter of the dtype's largest value, at
    its smallest normal, or among its subnormals (with |offset| <= 4)."""
    info = torch.finfo(dtype)
    if extreme:
        scale = draw(st.sampled_from([info.max / 8, info.tiny, info.smallest_normal * info.eps * 16]))
        offset = draw(st.sampled_from(EXTREME_OFFSETS))
    else:
        low, high = SCALE_EXP[dtype]
        scale = 10.0 ** draw(st.integers(low, high))
        power = draw(st.one_of(st.none(), st.integers(0, OFFSET_EXP[dtype])))
        offset = 0.0 if power is None else draw(st.sampled_from([1.0, -1.0])) * 10.0**power
    z = _floats(draw, shape)
    if constant_groups:
        constant = _bools(draw, tuple(1 if d in dims else s for d, s in enumerate(shape)))
        z = torch.where(constant, z.amax(dims, keepdim=True), z)
    return ((offset + z) * scale).to(dtype)


@st.composite
def masks(draw, mask_shape: Tuple[int, ...], *, degenerate: bool = False, padded: bool = False) -> torch.Tensor:
    """A bool mask of `mask_shape` (shrinks towards all True: a minimal counterexample masks out
    only what it needs); `degenerate` also draws all-False masks and masks with a single True, which
    leave groups empty or with one valid element; `padded`: at least one False."""
    mode = draw(st.sampled_from(["random", "none", "one"])) if degenerate else "random"
    if mode == "random":
        mask = ~_bools(draw, mask_shape).reshape(-1)
    else:
        mask = torch.zeros(math.prod(mask_shape), dtype=torch.bool)
        if mode == "one":
            mask[draw(st.integers(0, mask.numel() - 1))] = True
    if padded and mask.all():
        mask[draw(st.integers(0, mask.numel() - 1))] = False
    return mask.reshape(mask_shape)


def with_min_valid(mask: torch.Tensor, shape: Tuple[int, ...], dims: Tuple[int, ...], min_valid: int) -> torch.Tensor:
    """`mask` (broadcastable to `shape`) with masked-out entries turned valid, first ones first,
    until every group (reducing `dims`) holds at least `min_valid` valid positions or all of its
    positions; each entry turned valid raises the count of a group still short. The mask keeps its
    shrinking direction (towards all True), so a counterexample stays minimal under the floor."""
    if min_valid <= 0:
        return mask
    flat = mask.reshape(-1).clone()

    def per_group(m: torch.Tensor) -> torch.Tensor:
        return m.reshape(mask.shape).expand(shape).sum(dims, keepdim=True)

    for i in range(flat.numel()):
        short = per_group(flat) < min_valid
        if not short.any():
            break
        if not flat[i]:
            entry = torch.zeros_like(flat)
            entry[i] = True
            flat[i] = bool((short & (per_group(entry) > 0)).any())
    return flat.reshape(mask.shape)


def garbage_elements(dtype: torch.dtype) -> st.SearchStrategy[float]:
    """What padding may hold: NaN, +-Inf, +-the dtype's largest finite value."""
    return st.sampled_from(_garbage(dtype))


def _garbage(dtype: torch.dtype) -> Tuple[float, ...]:
    big = torch.finfo(dtype).max
    return (math.nan, math.inf, -math.inf, big, -big)


@st.composite
def with_garbage(draw, inp: MaskedInput) -> MaskedInput:
    """inp with every masked-out position of x replaced by garbage_elements."""
    choices = _garbage(inp.x.dtype)
    picks = [choices[b % len(choices)] for b in _units(draw, inp.x.numel())]
    junk = torch.tensor(picks, dtype=inp.x.dtype).reshape(inp.x.shape)
    return MaskedInput(torch.where(inp.valid, inp.x, junk), inp.mask, inp.dims)


@st.composite
def masked_inputs(
    draw,
    dim: Dim = -1,
    *,
    ndim: Optional[int] = None,
    mask_dims: Optional[Dim] = None,
    dtype: Union[str, torch.dtype] = torch.float64,
    mask: bool = True,
    min_group_size: int = 1,
    min_valid: int = 0,
    degenerate: bool = False,
    padded: bool = False,
    garbage: bool = False,
    extreme: bool = False,
    sides: Sides = None,
    shape_buckets: bool = False,
) -> MaskedInput:
    """A MaskedInput reduced over `dim`: x of rank `ndim` (None: any that fits, up to 3 when possible),
    a bool mask varying along `mask_dims` (mask=False: no mask), and the edge cases asked for
    (degenerate groups, at least one masked-out position, garbage padding, extreme magnitudes);
    `sides` constrains the shape (see side_ranges), `shape_buckets` draws only bucket_shapes;
    every group holds at least `min_group_size` positions and at least `min_valid` valid ones
    (with_min_valid: the constraint wins over `degenerate` and `padded`)."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    rank = draw(st.sampled_from(ranks(dim, ndim if sides is None else len(sides), mask_dims)))
    dims = normalize_dims(dim, rank)
    smallest = max(min_group_size, min_valid)
    if shape_buckets:
        shape = draw(st.sampled_from(bucket_shapes(rank, dims, smallest, sides)))
    else:
        shape = draw(shapes(rank, dims, smallest, sides))
    x = draw(values(shape, dims, dtype, constant_groups=degenerate, extreme=extreme))
    m = None
    if mask:
        m = with_min_valid(draw(masks(mask_shape(shape, mask_dims), degenerate=degenerate, padded=padded)), shape, dims, min_valid)
    inp = MaskedInput(x, m, dims)
    return draw(with_garbage(inp)) if garbage and mask else inp


@st.composite
def upstream_gradients(draw, inp: MaskedInput, *, zero_padding: bool = False) -> torch.Tensor:
    """An upstream gradient for inp's output: values in [-1, 1] in x's dtype, 0 at masked-out
    positions when `zero_padding`."""
    grad = _floats(draw, tuple(inp.x.shape)).to(inp.x.dtype)
    return torch.where(inp.valid, grad, torch.zeros((), dtype=grad.dtype)) if zero_padding else grad
