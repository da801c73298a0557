"""`masknorm check MODULE:CALLABLE`: does someone else's normalization compute what it claims?

Imports CALLABLE from MODULE (the current directory and PYTHONPATH first), calls it as fn(x, mask)
(fn(x) with --no-mask) on hypothesis-drawn inputs and compares it with the mpmath reference for the
claimed semantics (masknorm.testing.check). Exit status: 0 conforms, 1 a property fails, 2 a usage
error or a callable that cannot be imported or called.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Callable, Optional, Sequence, Tuple, Union

from .frameworks import NAMES
from .run import EXAMPLES, SHRINKS, CallError, check
from .semantics import DEGENERATE, Semantics
from .strategies import DTYPES

# Options whose value may start with "-" (negative axes): argparse would take "-2,-1" for an option.
_AXES_OPTIONS = ("--dim", "--mask-dims")


class _UsageError(Exception):
    """A problem with the command line or the target, reported with exit status 2."""


def _axes(text: str) -> Union[int, Tuple[int, ...]]:
    """"-1" -> -1, "0,2" -> (0, 2)."""
    try:
        axes = tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from err
    return axes[0] if len(axes) == 1 else axes


def _sides(text: str) -> Tuple[Optional[Union[int, Tuple[int, int]]], ...]:
    """"*,2-4,3" -> (None, (2, 4), 3): per axis any side, a range, or one side."""
    out: list = []
    try:
        for part in text.split(","):
            low, sep, high = part.partition("-")
            out.append(None if part == "*" else (int(low), int(high)) if sep else int(part))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected per axis *, N or LOW-HIGH separated by commas, got {text!r}") from err
    return tuple(out)


def _join_axes(argv: Sequence[str]) -> list:
    """argv with "--dim -2,-1" written as "--dim=-2,-1", so that argparse reads the negative axes."""
    out: list = []
    for arg in argv:
        if out and out[-1] in _AXES_OPTIONS and arg.startswith("-") and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="masknorm check", description=__doc__.split("\n\n")[0])
    p.add_argument("target", metavar="MODULE:CALLABLE", help="the normalization to check, e.g. mypkg.norms:layer_norm")
    p.add_argument("--ndim", type=int, help="rank of x (default: any rank that fits --dim, up to 3)")
    p.add_argument("--dim", type=_axes, default=-1, help="reduced axes, e.g. -1 or 0,2 (default -1)")
    masks = p.add_mutually_exclusive_group()
    masks.add_argument("--mask-dims", type=_axes, help="axes the mask varies along; size 1 elsewhere (default: all)")
    masks.add_argument("--no-mask", action="store_true", help="call fn(x): a plain (unmasked) normalization")
    p.add_argument("--squeeze-mask", action="store_true", help="pass the mask with only the --mask-dims axes (Keras, masked_norm)")
    p.add_argument("--padding-mask", action="store_true", help="the mask is True at padding (torch's key_padding_mask)")
    p.add_argument("--correction", type=int, default=0, help="variance divisor k - C (default 0: biased)")
    p.add_argument("--eps", type=float, default=1e-5, help="added to the variance (default 1e-5)")
    p.add_argument("--eps-outside", action="store_true", help="(x - mu)/(sigma + eps) instead of /sqrt(sigma^2 + eps)")
    p.add_argument("--rms", action="store_true", help="no mean subtraction (RMS norm)")
    p.add_argument("--masked", choices=("normalize", "keep", "zero"), default="normalize", help="output at masked-out positions")
    p.add_argument(
        "--degenerate", choices=DEGENERATE, default="passthrough",
        help="output of a group with no spread or no valid position (default passthrough: x)",
    )
    p.add_argument("--grad", action="store_true", help="also check gradients, by fn's framework's autodiff")
    p.add_argument("--framework", choices=NAMES, help="fn's arrays (default: detected from what fn returns)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float64")
    p.add_argument("--sides", type=_sides, help="per axis: *, N or LOW-HIGH, e.g. '*,*,2-4' (default: 1 to 8/6/4/3 by rank)")
    p.add_argument("--examples", type=int, default=EXAMPLES, help=f"hypothesis examples per property (default {EXAMPLES})")
    p.add_argument("--seed", type=int, help="hypothesis seed (default: derandomized, the same examples every run)")
    p.add_argument("--extreme", action="store_true", help="draw values at the dtype's overflow/underflow thresholds")
    p.add_argument("--min-group-size", type=int, default=1, help="smallest group fn accepts (default 1)")
    p.add_argument(
        "--shrinks", type=int, default=SHRINKS,
        help=f"successful shrinks of each counterexample (default {SHRINKS})",
    )
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    return p


def load(target: str) -> Callable[..., Any]:
    """The object named by "module:attr[.attr...]", importing module from the current directory
    or PYTHONPATH; _UsageError saying why when that fails."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise _UsageError(f"expected MODULE:CALLABLE, got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is reported as the reason
        raise _UsageError(f"cannot import {module_name!r}: {type(err).__name__}: {err}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _UsageError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise _UsageError(f"{target} is a {type(obj).__name__}, not callable")
    return obj


class _Progress:
    """One status line on stderr with the estimate of the time left: rewritten in place on a
    terminal, one line per property otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = None

    def __call__(self, line: str) -> None:
        if self.tty:
            sys.stderr.write(f"\r\033[K{line}")
        elif line.split(":")[0] != self.last:
            self.last = line.split(":")[0]
            sys.stderr.write(f"checking {line}\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `masknorm check` on argv; return the exit status (0 conforms, 1 fails, 2 usage)."""
    try:
        args = _parser().parse_args(_join_axes(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        semantics = Semantics(
            args.dim, args.correction, args.eps, not args.rms, args.masked, args.degenerate, args.eps_outside,
            args.padding_mask,
        )
        if args.examples < 1 or args.min_group_size < 1:
            raise _UsageError("--examples and --min-group-size must be >= 1")
        fn = load(args.target)
    except (_UsageError, TypeError, ValueError) as err:
        print(f"masknorm check: {err}", file=sys.stderr)
        return 2
    progress = _Progress()
    try:
        report = check(
            fn, semantics, ndim=args.ndim, mask_dims=args.mask_dims, mask=not args.no_mask, grad=args.grad,
            dtype=args.dtype, examples=args.examples, seed=args.seed, extreme=args.extreme,
            min_group_size=args.min_group_size, sides=args.sides, squeeze_mask=args.squeeze_mask,
            framework_name=args.framework, shrinks=args.shrinks, name=args.target, progress=progress,
        )
    except (CallError, TypeError, ValueError) as err:
        progress.done()
        print(f"masknorm check: cannot check {args.target}: {err}", file=sys.stderr)
        return 2
    progress.done()
    print(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0 if report.conforms else 1


if __name__ == "__main__":
    sys.exit(main())
