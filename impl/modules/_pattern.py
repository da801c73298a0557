"""A small einops-style axis pattern: names, composite axes "(g c)", unit axes "()" and one "...".

    "b (g c) t"  ->  x dimension 1 is split into g, c (row-major: index = g_i * c + c_i)

parse_pattern reads the text, parse_axes reads a list of names against it, resolve matches a
shape to it (inferring at most one unknown size per composite). Every error names the axis, the
size or the dimension that is wrong. Nothing here touches tensor values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

ELLIPSIS = "..."
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TOKEN = re.compile(r"\.\.\.|[()]|[^\s()]+")


@dataclass(frozen=True)
class Pattern:
    """groups[i] = the axis names x's i-th dimension splits into; ("...",) stands for any number of dimensions."""

    text: str
    groups: Tuple[Tuple[str, ...], ...]

    @property
    def names(self) -> Tuple[str, ...]:
        """The named axes, in order (the ellipsis excluded)."""
        return tuple(n for g in self.groups for n in g if n != ELLIPSIS)

    @property
    def has_ellipsis(self) -> bool:
        return (ELLIPSIS,) in self.groups


@dataclass(frozen=True)
class Layout:
    """x's shape split into the pattern's axes: names[j]/shape[j] per split axis ("..." per ellipsis dimension);
    split[i] = the sizes x's i-th dimension splits into."""

    names: Tuple[str, ...]
    shape: Tuple[int, ...]
    split: Tuple[Tuple[int, ...], ...]

    def positions(self, axes: Sequence[str]) -> Tuple[int, ...]:
        """Indices of `axes` in the split layout, in the order given."""
        return tuple(self.names.index(a) for a in axes)


def _check_name(name: str, text: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"pattern {text!r}: {name!r} is not an axis name (letters, digits and _, not starting with a digit)")


def parse_pattern(text: str) -> Pattern:
    """Parse 'b (g c) t ...' into groups; ValueError naming the offending token."""
    if not isinstance(text, str):
        raise TypeError(f"pattern must be a str, got {type(text).__name__}")
    groups, seen, current = [], set(), None
    for tok in _TOKEN.findall(text):
        if tok == "(":
            if current is not None:
                raise ValueError(f"pattern {text!r}: nested parentheses are not allowed")
            current = []
        elif tok == ")":
            if current is None:
                raise ValueError(f"pattern {text!r}: ')' without a matching '('")
            groups.append(tuple(current))
            current = None
        elif tok == ELLIPSIS:
            if current is not None:
                raise ValueError(f"pattern {text!r}: '...' cannot stand inside parentheses")
            if (ELLIPSIS,) in groups:
                raise ValueError(f"pattern {text!r}: '...' may appear only once")
            groups.append((ELLIPSIS,))
        else:
            _check_name(tok, text)
            if tok in seen:
                raise ValueError(f"pattern {text!r}: axis {tok!r} appears twice")
            seen.add(tok)
            if current is None:
                groups.append((tok,))
            else:
                current.append(tok)
    if current is not None:
        raise ValueError(f"pattern {text!r}: '(' is never closed")
    if not groups:
        raise ValueError("pattern is empty: name x's axes, e.g. 'b n d'")
    return Pattern(text, tuple(groups))


def parse_axes(text: str, pattern: Pattern, role: str) -> Tuple[str, ...]:
    """Space-separated axis names of `pattern`, e.g. reduce='n d'; `role` names the argument in errors."""
    if not isinstance(text, str):
        raise TypeError(f"{role} must be a str of axis names, got {type(text).__name__}")
    names = tuple(text.split())
    for n in names:
        if n not in pattern.names:
            raise ValueError(f"{role}={text!r}: axis {n!r} is not an axis of pattern {pattern.text!r}")
    for n in set(names):
        if names.count(n) > 1:
            raise ValueError(f"{role}={text!r}: axis {n!r} appears twice")
    return names


def check_sizes(pattern: Pattern, sizes: Mapping[str, int]) -> Dict[str, int]:
    """The given axis sizes as ints >= 1, each an axis of the pattern."""
    out = {}
    for name, size in sizes.items():
        if name not in pattern.names:
            raise ValueError(f"size {name}={size!r} is given, but {name!r} is not an axis of pattern {pattern.text!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size of axis {name!r} must be an int >= 1, got {size!r}")
        out[name] = size
    return out


def _product(sizes: Sequence[int]) -> int:
    out = 1
    for s in sizes:
        out *= s
    return out


def _split_group(group: Tuple[str, ...], size: int, dim: int, sizes: Mapping[str, int], text: str) -> Tuple[int, ...]:
    """Sizes of the axes in `group` for an x dimension of `size`, inferring at most one unknown."""
    label = group[0] if len(group) == 1 else "(" + " ".join(group) + ")"
    unknown = [n for n in group if n not in sizes]
    known = _product([sizes[n] for n in group if n in sizes])
    if len(unknown) > 1:
        raise ValueError(
            f"pattern {text!r}: cannot infer the sizes of {', '.join(unknown)} in {label} from x's size {size} "
            f"at dimension {dim}; give all but one of them"
        )
    if unknown:
        if size % known:
            raise ValueError(
                f"pattern {text!r}: x's size {size} at dimension {dim} is not divisible by the known sizes of "
                f"{label} (product {known}), so {unknown[0]!r} cannot be inferred"
            )
        return tuple([sizes[n] if n in sizes else size // known for n in group])
    if known != size:
        given = " * ".join([f"{n}={sizes[n]}" for n in group]) or "()"
        raise ValueError(f"pattern {text!r}: axis {label} has size {given} = {known} but x has size {size} at dimension {dim}")
    return tuple([sizes[n] for n in group])


def resolve(pattern: Pattern, shape: Sequence[int], sizes: Optional[Mapping[str, int]] = None) -> Layout:
    """Match x's shape to the pattern: the split layout, with sizes checked and composites inferred."""
    shape, sizes = tuple(shape), dict(sizes or {})  # not int(s): under torch.export that specializes sizes
    n_fixed = len(pattern.groups) - pattern.has_ellipsis
    if (len(shape) < n_fixed) if pattern.has_ellipsis else (len(shape) != n_fixed):
        need = f"at least {n_fixed}" if pattern.has_ellipsis else str(n_fixed)
        raise ValueError(f"pattern {pattern.text!r} needs {need} dimensions, but x has shape {shape} ({len(shape)} dimensions)")
    names, split, dim = [], [], 0
    for group in pattern.groups:
        if group == (ELLIPSIS,):
            n_ell = len(shape) - n_fixed
            names.extend([ELLIPSIS] * n_ell)
            split.extend([(s,) for s in shape[dim:dim + n_ell]])
            dim += n_ell
            continue
        split.append(_split_group(group, shape[dim], dim, sizes, pattern.text))
        names.extend(group)
        dim += 1
    return Layout(tuple(names), tuple([s for part in split for s in part]), tuple(split))
