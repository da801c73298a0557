"""The `masknorm` command line (package masknorm_cli): one subcommand per job, each living beside what it runs.

This package imports neither torch nor masknorm: `masknorm --help` and `masknorm <command> --help`
answer from the parsers in masknorm_cli.parsers, and a command's module (which imports torch, and
sympy or mpmath for the verification side) is imported only to run it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from masknorm_cli import parsers

# name -> the module:function that runs it, taking argv
SUBCOMMANDS = {
    "verify": "masknorm_cli.verify:main",
    "derive": "masknorm_cli.derive:main",
    "prove": "masknorm_cli.prove:main",
    "check": "masknorm_cli.check:main",
    "bench": "masknorm_cli.bench:main",
    "build": "masknorm_cli.build:main",
    "invariance": "masknorm_cli.invariance:main",
}
VERIFY_EXTRAS = {"sympy", "mpmath", "hypothesis", "numpy"}


def _usage() -> str:
    lines = ["usage: masknorm <command> [options]  |  masknorm --version", "", "commands:"]
    lines += [f"  {name:<11} {parsers.SUMMARIES[name]}" for name in SUBCOMMANDS]
    lines.append("\n'masknorm <command> --help' describes each command's options.")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        import masknorm  # imports torch: only here, never for --help

        print(f"masknorm {masknorm.__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"masknorm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        getattr(parsers, name)().print_help()
        return 0
    module, func = SUBCOMMANDS[name].split(":")
    try:
        entry = getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as exc:
        if exc.name not in VERIFY_EXTRAS:
            raise
        print(f"masknorm {name} needs the verification extras (missing {exc.name}): "
              "install the verify extra (from a checkout: pip install '.[verify]')", file=sys.stderr)
        return 2
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
