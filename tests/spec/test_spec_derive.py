"""`masknorm derive`: regenerates the committed files exactly; --check fails naming a file that drifted."""

import dataclasses
import pytest

from masknorm_cli import main as cli
from masknorm.spec import derivation, render
from masknorm.spec.definitions import k, nu
from masknorm.spec.derive import SPEC_DIR
from masknorm_cli.derive import main

GENERATED = ("DERIVATION.md", "closed_forms.py", "weight_norm_forms.py")


def test_check_passes_on_the_committed_files(capsys):
    assert main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "up to date" in out and "expansion n = 8" in out


def test_the_command_line_dispatches_derive():
    assert cli(["derive", "--check"]) == 0


def test_out_writes_the_committed_files(tmp_path):
    assert main(["--out", str(tmp_path)]) == 0
    for name in GENERATED:
        assert (tmp_path / name).read_text() == (SPEC_DIR / name).read_text()


@pytest.mark.parametrize("name,old,new", [
    ("closed_forms.py", "m_j/k)", "m_j/nu)"),
    ("DERIVATION.md", "identities in all", "identities, roughly"),
])
def test_check_fails_naming_a_drifted_file(tmp_path, capsys, name, old, new):
    for generated in GENERATED:
        (tmp_path / generated).write_text((SPEC_DIR / generated).read_text())
    text = (tmp_path / name).read_text()
    assert old in text
    (tmp_path / name).write_text(text.replace(old, new, 1))
    assert main(["--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert name in err
    assert all(other not in err for other in GENERATED if other != name)


def test_check_fails_on_a_missing_file(tmp_path, capsys):
    (tmp_path / "DERIVATION.md").write_text((SPEC_DIR / "DERIVATION.md").read_text())
    assert main(["--check", "--out", str(tmp_path)]) == 1
    assert "closed_forms.py" in capsys.readouterr().err


def test_check_fails_when_a_derived_formula_changes(monkeypatch, capsys):
    committed = {name: (SPEC_DIR / name).read_text() for name in GENERATED}
    forms = derivation.closed_forms()
    changed = tuple(dataclasses.replace(f, expr=f.expr.xreplace({nu: -nu})) if f.name == "vjp_rms" else f
                    for f in forms)
    monkeypatch.setattr(derivation, "closed_forms", lambda: changed)
    assert main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "closed_forms.py" in err and "DERIVATION.md" in err
    assert {name: (SPEC_DIR / name).read_text() for name in GENERATED} == committed  # --check writes nothing


def test_rendering_refuses_a_form_that_uses_a_name_it_does_not_take():
    forms = tuple(dataclasses.replace(f, expr=f.expr.xreplace({nu: k})) if f.name == "vjp_rms" else f
                  for f in derivation.closed_forms())
    with pytest.raises(ValueError, match="vjp_rms"):
        render.closed_forms_py(forms)
