"""`masknorm prove`: confirm every theorem symbolically (progress on stderr), print a table of
theorem, scope, status and seconds (or, with --json, a JSON list), exit 1 if any is not proved.
--expanded adds the explicit-n confirmations of theorems 11 and 12 (about 40 s more)."""

from __future__ import annotations

import json
import sys
import time
from typing import Optional, Sequence

from masknorm.proofs import theorems
from masknorm_cli import parsers
from masknorm.proofs.theorems import Outcome

DETAIL_CHARS = 300


def _table(outcomes: Sequence[Outcome]) -> str:
    rows = [("theorem", "scope", "status", "seconds")]
    rows += [(o.theorem.name, o.theorem.scope, o.status, f"{o.seconds:.2f}") for o in outcomes]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3]
                     for row in rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of `masknorm prove`; 0 when every selected theorem is proved, 1 otherwise."""
    everything = theorems.THEOREMS + theorems.EXPANDED
    known = [t.name for t in everything]
    parser = parsers.prove()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    unknown = sorted(set(args.names) - set(known))
    if unknown:
        parser.error(f"unknown theorem(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if args.names:
        selected = [t for t in everything if t.name in args.names]
    else:
        selected = list(everything if args.expanded else theorems.THEOREMS)
    start = time.perf_counter()
    outcomes = []
    for number, theorem in enumerate(selected, start=1):
        print(f"[{number}/{len(selected)}] {theorem.name} ...", end=" ", file=sys.stderr, flush=True)
        outcome = theorems.prove(theorem)
        print(f"{outcome.status} ({outcome.seconds:.2f} s)", file=sys.stderr, flush=True)
        if outcome.detail:
            print(f"    {outcome.detail[:DETAIL_CHARS]}", file=sys.stderr, flush=True)
        outcomes.append(outcome)
    failed = sum(o.status != "proved" for o in outcomes)
    if args.json:
        print(json.dumps([o.as_json() for o in outcomes], indent=2))
    else:
        print(_table(outcomes))
        print(f"{len(outcomes) - failed} of {len(outcomes)} proved in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
