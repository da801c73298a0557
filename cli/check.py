"""`masknorm check MODULE:CALLABLE`: does someone else's normalization compute what it claims?

Imports CALLABLE from MODULE (the current directory and PYTHONPATH first), calls it as fn(x, mask)
(fn(x) with --no-mask, fn(x_nodes, batch) with --segments) on hypothesis-drawn inputs and compares
it with the mpmath reference for the claimed semantics (masknorm.testing.check). Exit status: 0 conforms, 1 a property fails, 2 a usage
error or a callable that cannot be imported or called.
"""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from masknorm._heartbeat import Heartbeat
from masknorm_cli import parsers
from masknorm_cli.targets import UsageError as _UsageError, load

from masknorm.reference.oracle.run import CallError, check
from masknorm.reference.oracle.semantics import Semantics


class _Progress:
    """One status line on stderr with the estimate of the time left: rewritten in place on a
    terminal, one line per property otherwise, and the latest line again whenever 10 s pass without one."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = None
        self.latest = "starting"
        self.heartbeat = Heartbeat(self._again, lambda: f"checking {self.latest}")

    def _again(self, line: str) -> None:
        sys.stderr.write(f"\r\033[K{line}\n" if self.tty else f"{line}\n")
        sys.stderr.flush()

    def __call__(self, line: str) -> None:
        self.latest = line
        if self.tty:
            sys.stderr.write(f"\r\033[K{line}")
            self.heartbeat.said()
        elif line.split(":")[0] != self.last:
            self.last = line.split(":")[0]
            sys.stderr.write(f"checking {line}\n")
            self.heartbeat.said()
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `masknorm check` on argv; return the exit status (0 conforms, 1 fails, 2 usage)."""
    try:
        args = parsers.check().parse_args(parsers.join_axes(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        semantics = Semantics(
            args.dim, args.correction, args.eps, not args.rms, args.masked, args.degenerate, args.eps_outside,
            args.padding_mask,
        )
        if args.examples < 1 or args.min_group_size < 1:
            raise _UsageError("--examples and --min-group-size must be >= 1")
        if args.min_valid < 0:
            raise _UsageError("--min-valid must be >= 0")
        fn = load(args.target)
    except (_UsageError, TypeError, ValueError) as err:
        print(f"masknorm check: {err}", file=sys.stderr)
        return 2
    progress = _Progress()
    try:
        with progress.heartbeat:
            report = check(
                fn, semantics, ndim=args.ndim, mask_dims=args.mask_dims, mask=not args.no_mask, grad=args.grad,
                dtype=args.dtype, examples=args.examples, seed=args.seed, extreme=args.extreme,
                min_group_size=args.min_group_size, min_valid=args.min_valid, sides=args.sides,
                squeeze_mask=args.squeeze_mask, segments=args.segments,
                framework_name=args.framework, jit=not args.no_jit,
                shape_buckets=None if args.shapes is None else args.shapes == "buckets", shrinks=args.shrinks,
                name=args.target, progress=progress,
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
