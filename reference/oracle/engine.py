"""What the oracle needs from hypothesis beyond `settings`: the same examples in every run, and a
cap on the time spent shrinking a counterexample.

    derandomize=True fixes the seed, but hypothesis also mixes in constants it collects from every
    local module imported so far (importing one more module changed an identical check from 151 to
    156 calls); while `controlled` is active no local constant is used. Both knobs are hypothesis
    internals (checked with hypothesis 6.170); tests/test_oracle_speed.py fails if they move.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from hypothesis.internal.conjecture import engine, providers


@contextmanager
def controlled(shrink_seconds: float) -> Iterator[None]:
    """Within the block: no local-module constants in generation, shrinking stops after
    `shrink_seconds` (hypothesis then reports the smallest failure found so far)."""
    saved = providers._get_local_constants, engine.MAX_SHRINKING_SECONDS
    providers._get_local_constants = providers.Constants
    providers.CONSTANTS_CACHE.cache.clear()
    engine.MAX_SHRINKING_SECONDS = shrink_seconds
    try:
        yield
    finally:
        providers._get_local_constants, engine.MAX_SHRINKING_SECONDS = saved
        providers.CONSTANTS_CACHE.cache.clear()
