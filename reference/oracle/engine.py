"""What the oracle needs from hypothesis beyond `settings`: the same examples in every run, and a
cap on shrinking that does not depend on the machine's speed.

    derandomize=True fixes the seed, but hypothesis also mixes in constants it collects from every
    local module imported so far (importing one more module changed an identical check from 151 to
    156 calls); while `controlled` is active no local constant is used. Shrinking stops after a
    number of successful shrinks (deterministic: a time limit made the shrunk example depend on the
    load), with a time limit only as a safety net. These knobs are hypothesis internals (checked
    with hypothesis 6.170); tests/oracle/test_oracle_options.py fails if they move.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from hypothesis.internal.conjecture import engine, providers


@contextmanager
def controlled(shrinks: int, shrink_seconds: float = 60.0) -> Iterator[None]:
    """Within the block: no local-module constants in generation; shrinking stops after `shrinks`
    successful shrinks or `shrink_seconds` (hypothesis then reports the smallest failure so far)."""
    saved = providers._get_local_constants, engine.MAX_SHRINKS, engine.MAX_SHRINKING_SECONDS
    providers._get_local_constants = providers.Constants
    providers.CONSTANTS_CACHE.cache.clear()
    engine.MAX_SHRINKS, engine.MAX_SHRINKING_SECONDS = shrinks, shrink_seconds
    try:
        yield
    finally:
        providers._get_local_constants, engine.MAX_SHRINKS, engine.MAX_SHRINKING_SECONDS = saved
        providers.CONSTANTS_CACHE.cache.clear()
