"""The `masknorm` command line: one subcommand per job, each living beside what it runs.

Subcommands are resolved lazily so that `masknorm bench` never imports sympy and
`masknorm derive` never imports torch's heavier machinery more than needed.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# name -> (module:function taking argv, one-line help)
SUBCOMMANDS = {
    "verify": ("masknorm.reference.verify:main", "the main job: derive --check, then the torch layers vs the reference"),
    "derive": ("masknorm.spec.derive:main", "regenerate the symbolic derivations (--check: fail on drift)"),
    "prove": ("masknorm.proofs.cli:main", "confirm the theorems symbolically (table, or --json)"),
    "check": ("masknorm.reference.check:main", "check your own normalization against the reference (exit 0/1/2)"),
    "bench": ("masknorm.bench:main", "time masked_norm against torch's native kernels (ratios, memory)"),
    "invariance": ("masknorm.invariance_cli:main", "is a whole model padding-invariant? (exit 0/1/2)"),
}


VERIFY_EXTRAS = {"sympy", "mpmath", "hypothesis", "numpy"}


def _usage() -> str:
    lines = ["usage: masknorm <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines.append("\n'masknorm <command> --help' describes each command's options.")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"masknorm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target = SUBCOMMANDS[name][0]
    module, func = target.split(":")
    try:
        entry = getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as exc:
        if exc.name not in VERIFY_EXTRAS:
            raise
        print(
            f"masknorm {name} needs the verification extras (missing {exc.name}): "
            "pip install 'masknorm[verify]'",
            file=sys.stderr,
        )
        return 2
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
