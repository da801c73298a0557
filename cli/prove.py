"""`masknorm prove [THEOREM ...]`: confirm the theorems symbolically (progress on stderr, a line at least
every 10 s), print a table of number, theorem, status, seconds and scope within 100 columns (or, with
--json, a JSON list), exit 1 if any is not proved. THEOREM is a number as the documentation gives it
(1-17, 11e/12e for the explicit expansions) or a name.
--expanded adds the explicit-n confirmations of theorems 11 and 12 (about 40 s more)."""

from __future__ import annotations

import functools
import json
import sys
import textwrap
import time
from typing import Dict, Optional, Sequence

from masknorm._heartbeat import Heartbeat
from masknorm.proofs import theorems
from masknorm.proofs.theorems import Outcome, Theorem
from masknorm_cli import parsers

DETAIL_CHARS = 300
WIDTH = 100  # the table's lines fit this many columns: the scope column wraps
EXPANDED_SUFFIX = "_expanded"


def numbers() -> Dict[str, Theorem]:
    """The theorems by the numbers the documentation gives them: 1.. in THEOREMS' order, and "<n>e" for
    the explicit expansion of theorem n (the check named like it, plus _expanded)."""
    numbered = {str(n): t for n, t in enumerate(theorems.THEOREMS, start=1)}
    by_name = {t.name: n for n, t in numbered.items()}
    for theorem in theorems.EXPANDED:
        base = by_name.get(theorem.name.removesuffix(EXPANDED_SUFFIX))
        numbered[f"{base}e" if base else theorem.name] = theorem
    return numbered


def _table(outcomes: Sequence[Outcome], labels: Sequence[str]) -> str:
    rows = [("#", "theorem", "status", "seconds")]
    rows += [(label, o.theorem.name, o.status, f"{o.seconds:.2f}") for label, o in zip(labels, outcomes)]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lead = [f"{row[0]:>{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]:>{widths[3]}}  "
            for row in rows]
    room = max(20, WIDTH - len(lead[0]))
    scopes = ["scope"] + [o.theorem.scope for o in outcomes]
    lines = []
    for start, scope in zip(lead, scopes):
        wrapped = textwrap.wrap(scope, room) or [""]
        lines.append((start + wrapped[0]).rstrip())
        lines += [" " * len(start) + more for more in wrapped[1:]]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of `masknorm prove`; 0 when every selected theorem is proved, 1 otherwise."""
    everything = theorems.THEOREMS + theorems.EXPANDED
    numbered = numbers()
    label = {t.name: n for n, t in numbered.items()}
    by_name = {t.name: t for t in everything}
    parser = parsers.prove()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    unknown = [name for name in args.names if name not in by_name and name not in numbered]
    if unknown:
        parser.error(f"unknown theorem(s) {', '.join(unknown)}; known: {', '.join(numbered)} or the names "
                     f"{', '.join(by_name)}")
    if args.names:
        wanted = {by_name[name].name if name in by_name else numbered[name].name for name in args.names}
        selected = [t for t in everything if t.name in wanted]
    else:
        selected = list(everything if args.expanded else theorems.THEOREMS)
    start = time.perf_counter()
    outcomes = []
    say = functools.partial(print, file=sys.stderr, flush=True)
    for count, theorem in enumerate(selected, start=1):
        head = f"[{count}/{len(selected)}] {label[theorem.name]} {theorem.name}"
        say(f"{head} ...")
        with Heartbeat(say, head):
            outcome = theorems.prove(theorem)
        say(f"{head}: {outcome.status} ({outcome.seconds:.2f} s)")
        if outcome.detail:
            say(f"    {outcome.detail[:DETAIL_CHARS]}")
        outcomes.append(outcome)
    failed = sum(o.status != "proved" for o in outcomes)
    if args.json:
        print(json.dumps([o.as_json() for o in outcomes], indent=2))
    else:
        print(_table(outcomes, [label[o.theorem.name] for o in outcomes]))
        print(f"{len(outcomes) - failed} of {len(outcomes)} proved in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
