"""The command line answers --help without importing torch (masknorm_cli), with the options the commands
parse; `masknorm bench` shows the spread of its runs and warns when they are too noisy to compare."""

import subprocess
import sys
import types

import pytest

from masknorm_cli import bench
from masknorm_cli import SUBCOMMANDS, parsers

_NO_TORCH = ("import sys; from masknorm_cli import main; code = main({argv!r}); "
             "assert 'torch' not in sys.modules and 'masknorm' not in sys.modules, 'imported'; sys.exit(code)")


@pytest.mark.parametrize("argv", [["--help"], *[[name, "--help"] for name in SUBCOMMANDS]])
def test_help_answers_without_importing_torch(argv):
    done = subprocess.run([sys.executable, "-c", _NO_TORCH.format(argv=argv)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: masknorm" in done.stdout


def test_every_command_has_a_parser_and_a_summary():
    for name in SUBCOMMANDS:
        assert getattr(parsers, name)().prog == f"masknorm {name}"
        assert parsers.SUMMARIES[name]


def test_the_check_dtypes_are_the_reference_strategies_dtypes():
    from masknorm.reference.oracle.strategies import DTYPES

    assert parsers.CHECK_DTYPES == tuple(DTYPES)


def test_spread_is_the_interquartile_range_over_the_median():
    assert bench.spread([0.004]) == 0.0
    assert bench.spread([1.0, 1.0, 1.0]) == 0.0
    assert bench.spread([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx((4 - 2) / 3)


@pytest.mark.parametrize("worst, warns", [(0.05, False), (0.19, False), (0.6, True)])
def test_bench_warns_when_runs_are_too_noisy(worst, warns, capsys):
    result = {"median_ms": {"masknorm": 2.0, "F.layer_norm": 1.0}, "spread": {"masknorm": worst, "F.layer_norm": 0.01},
              "saved_over_x": {"masknorm": 1.0, "F.layer_norm": 1.0}, "native": "F.layer_norm"}
    bench._print_case(types.SimpleNamespace(name="case"), result)
    out = capsys.readouterr().out
    assert f"{100 * worst:.0f}%" in out
    assert ("WARNING: too noisy" in out) == warns


def test_the_readme_example_is_importable_from_the_installed_package(tmp_path, monkeypatch):
    """`masknorm check masknorm.examples.buggy_norm:sequence_norm` needs no checkout in the current directory."""
    from masknorm_cli.check import load

    monkeypatch.chdir(tmp_path)
    fn = load("masknorm.examples.buggy_norm:sequence_norm")
    assert fn.__name__ == "sequence_norm" and fn.__module__ == "masknorm.examples.buggy_norm"


def test_the_oracles_choices_are_the_command_lines():
    from masknorm.reference.oracle import frameworks, run, semantics

    assert frameworks.NAMES == parsers.CHECK_FRAMEWORKS
    assert semantics.DEGENERATE == parsers.CHECK_DEGENERATE
    assert (run.EXAMPLES, run.SHRINKS) == (parsers.CHECK_EXAMPLES, parsers.CHECK_SHRINKS)


def test_version_prints_the_installed_distributions_version():
    """`masknorm --version` reads masknorm.__version__, the one source pyproject's version comes from."""
    import importlib.metadata

    argv = [sys.executable, "-c", "import sys; from masknorm_cli import main; sys.exit(main(['--version']))"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"masknorm {importlib.metadata.version('masknorm')}\n"
