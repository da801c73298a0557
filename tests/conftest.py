"""Hypothesis profiles: dev (default, quick), ci (derandomized: the same examples every run),
thorough (many examples, no deadline). Pick one with HYPOTHESIS_PROFILE; CI=true selects ci.

Markers: `thorough` sweeps are deselected (not collected-and-skipped) unless `-m` names thorough;
`slow` marks what the quick development subset leaves out (`python -m pytest -m "not slow"`):
the files and test functions in SLOW (the longest in a timed run of the whole suite on 2 cores:
a full sympy re-derivation, expansion at n >= 5, the oracle's hypothesis runs, compiles and exports,
10^7-value channels, multi-process runs, transformers models, benchmark runs) and tests marked slow where they are defined."""

import os
from pathlib import Path

import pytest
import torch

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=30, **_common)
settings.register_profile("ci", max_examples=40, derandomize=True, print_blob=True, **_common)
settings.register_profile("thorough", max_examples=1000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

SLOW = {
    "test_spec_derive.py", "test_cli_check.py", "test_cli_prove.py", "test_cli_bench.py", "test_oracle_bugs.py",
    "test_oracle_conformance.py", "test_modules_compile.py", "test_impl_compiled.py", "test_impl_deployed.py",
    "test_impl_at_scale.py", "test_modules_sync_batch_norm.py", "test_models_transformers.py", "test_fast_ops.py",
    "test_portability.py",
    "test_oracle_parts.py::test_strategies_reach_the_edge_cases",
    "test_spec_expansion.py::test_generic_closed_forms_equal_the_expansion",
    "test_impl_autograd.py::test_compile_fullgraph_equals_eager",
    "test_impl_properties.py::test_garbage_padding",
    "test_proofs_theorems.py::test_theorem_is_proved",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = Path(str(item.fspath)).name
        if name in SLOW or f"{name}::{getattr(item, 'originalname', item.name)}" in SLOW:
            item.add_marker(pytest.mark.slow)
    if "thorough" in (config.getoption("-m") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("thorough")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("thorough")]


@pytest.fixture
def compile_strictly():
    """Recompiles are errors within the test (no silent fallback to eager at the recompile limit)."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=10_000, fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()
