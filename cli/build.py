"""`masknorm build`: build the fused CPU kernels now (a container image's build step), or say why not."""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

from masknorm.fast import kernel_cache, native
from masknorm_cli import parsers


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished children (ninja, the compiler)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`masknorm build`: build the fused CPU kernel now (for a container image), or say why it cannot be."""
    args = parsers.build().parse_args(argv)
    target = kernel_cache.library()
    if args.where:
        print(target)
        return 0
    if target.exists():
        print(f"masknorm build: already built, nothing to do: {target}")
        return 0
    start, cpu = time.perf_counter(), _cpu_s()
    try:
        kernel_cache.obtain(native.announce, native.say)
    except Exception as error:
        print(f"masknorm build: failed ({native.cause(error)})", file=sys.stderr)
        return 1
    print(f"masknorm build: {target} ({time.perf_counter() - start:.1f} s wall, {_cpu_s() - cpu:.1f} s CPU "
          "with the compiler's)")
    return 0
