"""`python -m masknorm.cli`: the `masknorm` command line, which lives in masknorm_cli (importable without torch)."""

import sys

from masknorm_cli import SUBCOMMANDS, main

__all__ = ["SUBCOMMANDS", "main"]

if __name__ == "__main__":
    sys.exit(main())
