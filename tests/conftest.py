"""Hypothesis profiles: dev (default, quick), ci (derandomized: the same examples every run),
thorough (many examples, no deadline). Pick one with HYPOTHESIS_PROFILE; CI=true selects ci.

Markers: `thorough` sweeps are deselected (not collected-and-skipped) unless `-m` names thorough;
`slow` marks what the quick development subset leaves out (`python -m pytest -m "not slow"`):
the files in SLOW_FILES (a full sympy re-derivation, hypothesis runs of the oracle through the
command line, benchmark runs) and tests marked slow where they are defined."""

import os
from pathlib import Path

import pytest

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=30, **_common)
settings.register_profile("ci", max_examples=40, derandomize=True, print_blob=True, **_common)
settings.register_profile("thorough", max_examples=1000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

SLOW_FILES = {"test_spec_derive.py", "test_check_cli.py", "test_proofs_cli.py", "test_bench_cli.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
    if "thorough" in (config.getoption("-m") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("thorough")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("thorough")]
