"""`masknorm verify`'s fast leg: spec/FINGERPRINT.json says which sources and sympy the generated files came
from; verify trusts them only while that holds, and says which it did. `derive` refuses to write into
an installed package and prints progress within its long steps."""

import json
import shutil

import pytest

from masknorm.spec import derive, fingerprint
from masknorm_cli import derive as derive_command, verify


def _copy_generated(folder):
    for name in (*fingerprint.GENERATED, fingerprint.RECORD):
        shutil.copy(fingerprint.SPEC_DIR / name, folder / name)


def test_the_committed_record_holds():
    """Fails when a spec source or a generated file changed without `masknorm derive` (which re-records)."""
    assert fingerprint.stale() == []


def test_an_edited_generated_file_is_stale(tmp_path):
    _copy_generated(tmp_path)
    assert fingerprint.stale(tmp_path) == []
    path = tmp_path / "DERIVATION.md"
    path.write_text(path.read_text().replace("identities", "identitie", 1))
    assert fingerprint.stale(tmp_path) == ["DERIVATION.md differs from the recorded derivation"]


def test_another_sympy_or_missing_record_is_stale(tmp_path):
    _copy_generated(tmp_path)
    record = json.loads((tmp_path / fingerprint.RECORD).read_text())
    (tmp_path / fingerprint.RECORD).write_text(json.dumps(dict(record, sympy="0.1")))
    assert fingerprint.stale(tmp_path) == [f"sympy is {record['sympy']}, the record was derived with 0.1"]
    (tmp_path / fingerprint.RECORD).unlink()
    assert fingerprint.stale(tmp_path) == [f"no readable {fingerprint.RECORD}"]


def test_a_changed_source_is_stale(tmp_path, monkeypatch):
    spec = tmp_path / "spec"
    shutil.copytree(fingerprint.SPEC_DIR, spec, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fingerprint, "SPEC_DIR", spec)
    assert fingerprint.stale(spec) == []
    (spec / "definitions.py").write_text((spec / "definitions.py").read_text() + "\n")
    assert fingerprint.stale(spec) == ["the spec's sources changed since the record"]


def test_verify_trusts_a_holding_record_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(derive_command, "main", lambda argv: pytest.fail("re-derived although the record holds"))
    assert verify._spec_is_current(rederive=False)
    assert "not re-derived" in capsys.readouterr().out


@pytest.mark.parametrize("rederive, reasons, shown", [(True, [], "--rederive"),
                                                      (False, ["sympy is 9, the record was derived with 1"], "sympy is 9")])
def test_verify_rederives_when_asked_or_when_the_record_fails(rederive, reasons, shown, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(fingerprint, "stale", lambda: reasons)
    monkeypatch.setattr(derive_command, "main", lambda argv: calls.append(argv) or 0)
    assert verify._spec_is_current(rederive)
    assert calls == [["--check"]]
    assert f"spec: re-deriving ({shown}" in capsys.readouterr().out


def test_verify_fails_when_the_rederivation_differs(monkeypatch, capsys):
    monkeypatch.setattr(fingerprint, "stale", lambda: ["x"])
    monkeypatch.setattr(derive_command, "main", lambda argv: 1)
    assert not verify._spec_is_current(False)
    assert "FAIL" in capsys.readouterr().out


def test_derive_refuses_to_write_into_an_installed_package(monkeypatch, capsys):
    monkeypatch.setattr(derive, "checkout_spec_dir", lambda: None)
    monkeypatch.setattr(derive, "derive", lambda: pytest.fail("derived before refusing"))
    assert derive_command.main([]) == 2
    assert "Pass --out DIR" in capsys.readouterr().err


def test_derive_prints_progress_within_a_step(monkeypatch, capsys):
    monkeypatch.setattr(derive, "PROGRESS_S", 0.0)
    report = derive._progress(8)
    report(3, 10)
    report(10, 10)
    assert capsys.readouterr().out.splitlines() == ["    n = 8: 3/10 steps, 0 s"]
