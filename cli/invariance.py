"""`masknorm invariance MODULE:FUNCTION`: the padding-invariance check from the command line.

FUNCTION() returns the keyword arguments of masknorm.models.invariance.check_padding_invariance (at least
model, x, lengths). Exit 0 when the model is padding-invariant, 1 when not, 2 on usage errors.
Needs torch only (not the `verify` extras).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch

import masknorm
from masknorm.models.invariance import check_padding_invariance
from masknorm_cli import parsers
from masknorm_cli.targets import UsageError, load


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the check named by argv; return the exit status (0 invariant, 1 not, 2 usage)."""
    try:
        args = parsers.invariance().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        case = dict(load(args.target)())
        if args.convert:
            masknorm.convert(case["model"])
            case["name"] = f"{case.get('name', type(case['model']).__name__)} after masknorm.convert"
        if args.scenarios is not None:
            case["scenarios"] = tuple(args.scenarios.split(","))
        report = check_padding_invariance(**case, modes=tuple(args.modes.split(",")), rtol=args.rtol,
                                          dtype=getattr(torch, args.dtype))
    except (UsageError, TypeError, ValueError, KeyError) as err:
        print(f"masknorm invariance: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
