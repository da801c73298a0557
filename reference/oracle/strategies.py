"""Hypothesis strategies for masked-normalization inputs, for masknorm's oracle and other test suites.

    x = (offset + z) * scale rounded once to the dtype, z in [-1, 1], |offset| up to 1e6 (kappa ~ |offset|);
    mask: bool, x's rank, size 1 on the axes it does not vary along

Edge cases on request: all-masked groups, one valid element, constant groups (`degenerate`), NaN,
+-Inf and the dtype's largest value at masked-out positions (`garbage`), and values at the dtype's
overflow and underflow thresholds (`extreme`).
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


@st.composite
def shapes(draw, rank: int, dims: Tuple[int, ...], min_group_size: int = 1) -> Tuple[int, ...]:
    """A shape of `rank` with sides 1..MAX_SIDE[rank] whose groups (the `dims` axes) hold at least
    `min_group_size` positions."""
    side = MAX_SIDE.get(rank, 2)
    sides = st.tuples(*[st.integers(1, side)] * rank)
    return draw(sides.filter(lambda s: math.prod(s[d] for d in dims) >= min_group_size))


def mask_shape(shape: Tuple[int, ...], mask_dims: Optional[Dim]) -> Tuple[int, ...]:
    """`shape` with size 1 on the axes not in `mask_dims` (None: the mask varies along every axis)."""
    varying = range(len(shape)) if mask_dims is None else normalize_dims(mask_dims, len(shape))
    return tuple(s if d in varying else 1 for d, s in enumerate(shape))


def _floats(draw, shape: Tuple[int, ...], low: float, high: float) -> torch.Tensor:
    count = math.prod(shape)
    drawn = draw(st.lists(st.floats(low, high, width=32), min_size=count, max_size=count))
    return torch.tensor(drawn, dtype=torch.float64).reshape(shape)


def _bools(draw, shape: Tuple[int, ...]) -> torch.Tensor:
    count = math.prod(shape)
    return torch.tensor(draw(st.lists(st.booleans(), min_size=count, max_size=count)), dtype=torch.bool).reshape(shape)


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
    z = _floats(draw, shape, -1.0, 1.0)
    if constant_groups:
        constant = _bools(draw, tuple(1 if d in dims else s for d, s in enumerate(shape)))
        z = torch.where(constant, z.amax(dims, keepdim=True), z)
    return ((offset + z) * scale).to(dtype)


@st.composite
def masks(draw, mask_shape: Tuple[int, ...], *, degenerate: bool = False) -> torch.Tensor:
    """A bool mask of `mask_shape` (shrinks towards all True: a minimal counterexample masks out
    only what it needs); `degenerate` also draws all-False masks and masks with a single True, which
    leave groups empty or with one valid element."""
    mode = draw(st.sampled_from(["random", "none", "one"])) if degenerate else "random"
    if mode == "random":
        return ~_bools(draw, mask_shape)
    mask = torch.zeros(math.prod(mask_shape), dtype=torch.bool)
    if mode == "one":
        mask[draw(st.integers(0, mask.numel() - 1))] = True
    return mask.reshape(mask_shape)


def garbage_elements(dtype: torch.dtype) -> st.SearchStrategy[float]:
    """What padding may hold: NaN, +-Inf, +-the dtype's largest finite value."""
    big = torch.finfo(dtype).max
    return st.sampled_from([math.nan, math.inf, -math.inf, big, -big])


@st.composite
def with_garbage(draw, inp: MaskedInput) -> MaskedInput:
    """inp with every masked-out position of x replaced by garbage_elements."""
    junk = torch.tensor(
        draw(st.lists(garbage_elements(inp.x.dtype), min_size=inp.x.numel(), max_size=inp.x.numel())), dtype=inp.x.dtype
    ).reshape(inp.x.shape)
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
    degenerate: bool = False,
    garbage: bool = False,
    extreme: bool = False,
) -> MaskedInput:
    """A MaskedInput reduced over `dim`: x of rank `ndim` (None: any that fits, up to 3 when possible),
    a bool mask varying along `mask_dims` (mask=False: no mask), and the edge cases asked for
    (degenerate groups, garbage padding, extreme magnitudes)."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    rank = draw(st.sampled_from(ranks(dim, ndim, mask_dims)))
    dims = normalize_dims(dim, rank)
    # The shape is drawn first, the content at the largest shape, then sliced: the shrinker can
    # shrink the shape without shifting what the other draws read.
    shape = draw(shapes(rank, dims, min_group_size))
    largest = (MAX_SIDE.get(rank, 2),) * rank
    big = MaskedInput(
        draw(values(largest, dims, dtype, constant_groups=degenerate, extreme=extreme)),
        draw(masks(mask_shape(largest, mask_dims), degenerate=degenerate)) if mask else None,
        dims,
    )
    if garbage and mask:
        big = draw(with_garbage(big))
    x = big.x[tuple(slice(0, s) for s in shape)]
    m = None if big.mask is None else big.mask[tuple(slice(0, s) for s in mask_shape(shape, mask_dims))]
    return MaskedInput(x.contiguous(), None if m is None else m.contiguous(), dims)


@st.composite
def upstream_gradients(draw, inp: MaskedInput, *, zero_padding: bool = False) -> torch.Tensor:
    """An upstream gradient for inp's output: values in [-1, 1] in x's dtype, 0 at masked-out
    positions when `zero_padding`."""
    grad = _floats(draw, tuple(inp.x.shape), -1.0, 1.0).to(inp.x.dtype)
    return torch.where(inp.valid, grad, torch.zeros((), dtype=grad.dtype)) if zero_padding else grad
