"""`masknorm prove` (masknorm_cli.prove:main): the table, --json, progress on stderr, exit 1 when
a theorem is not proved (a false statement or a check that raises), and a light package import."""

import json
import subprocess
import sys

import pytest

from masknorm_cli import prove as cli
from masknorm.proofs import inference, theorems
from masknorm.proofs.theorems import THEOREMS, Theorem
from masknorm.spec.definitions import beta, p

KEYS = {"name", "statement", "scope", "status", "seconds"}


def wrong_intercept():
    """Inference intercept with the wrong sign: b = beta + a rm.
    Scope: a false statement, to see it reported."""
    return inference.inference_is_affine(claimed_intercept=lambda a: beta[p] + a * inference.RUNNING_MEAN)


def raising():
    """A check that cannot run.
    Scope: none."""
    raise ArithmeticError("cannot decide")


def empty():
    """A check with nothing to reduce.
    Scope: none."""
    return ()


def test_prove_all_prints_the_table_and_exits_0(capsys):
    assert cli.main([]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["#", "theorem", "status", "seconds", "scope"]
    rows = [line.split() for line in lines[1:-1] if line.split()[0].isdigit()]
    assert [row[:3] for row in rows] == [[str(n), t.name, "proved"] for n, t in enumerate(THEOREMS, start=1)]
    assert max(len(line) for line in lines) <= cli.WIDTH
    assert lines[-1].startswith(f"{len(THEOREMS)} of {len(THEOREMS)} proved in ")
    assert err.count("proved (") == len(THEOREMS) and f"[{len(THEOREMS)}/{len(THEOREMS)}]" in err


def test_json_lists_the_selected_theorems(capsys):
    assert cli.main(["--json", "inference_is_affine", "shift_invariance"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in entries] == ["shift_invariance", "inference_is_affine"]
    for entry in entries:
        assert set(entry) == KEYS and entry["status"] == "proved" and entry["seconds"] >= 0
        assert entry["statement"] and entry["scope"]


@pytest.mark.parametrize("check", [wrong_intercept, raising, empty])
def test_a_theorem_not_proved_is_reported_failed_and_exits_1(check, monkeypatch, capsys):
    monkeypatch.setattr(theorems, "THEOREMS", (THEOREMS[0], Theorem(check)))
    assert cli.main(["--json"]) == 1
    out, err = capsys.readouterr()
    statuses = {e["name"]: e["status"] for e in json.loads(out)}
    assert statuses == {"shift_invariance": "proved", check.__name__: "failed"}
    assert "failed (" in err


def test_theorems_are_selected_by_the_documentations_numbers_or_by_name(capsys):
    assert cli.main(["--json", "9", "shift_invariance"]) == 0
    assert [e["name"] for e in json.loads(capsys.readouterr().out)] == ["shift_invariance", "inference_is_affine"]
    numbered = cli.numbers()
    assert [numbered[str(n)] for n in range(1, len(THEOREMS) + 1)] == list(THEOREMS)
    assert numbered["11e"].name == "permutation_equivariance_expanded"
    assert numbered["12e"].name == "valid_values_alone_expanded"


def test_unknown_theorem_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["no_such_theorem"])
    assert exit_.value.code == 2 and "no_such_theorem" in capsys.readouterr().err


def test_module_runs_as_a_script_and_the_package_import_is_light():
    done = subprocess.run([sys.executable, "-m", "masknorm_cli.prove", "--json", "inference_is_affine"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and json.loads(done.stdout)[0]["status"] == "proved"
    code = "import sys, masknorm.proofs; assert 'sympy' not in sys.modules, 'sympy imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, check=False).returncode == 0


def test_expanded_confirmations_run_only_when_asked(monkeypatch, capsys):
    cheap = Theorem(inference.inference_is_affine)
    monkeypatch.setattr(theorems, "THEOREMS", (THEOREMS[0],))
    monkeypatch.setattr(theorems, "EXPANDED", (cheap,))
    assert cli.main(["--json"]) == 0
    assert [e["name"] for e in json.loads(capsys.readouterr().out)] == ["shift_invariance"]
    assert cli.main(["--json", "--expanded"]) == 0
    assert [e["name"] for e in json.loads(capsys.readouterr().out)] == ["shift_invariance", "inference_is_affine"]
