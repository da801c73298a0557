"""`python -m masknorm_cli`: the `masknorm` command."""

import sys

from masknorm_cli import main

sys.exit(main())
