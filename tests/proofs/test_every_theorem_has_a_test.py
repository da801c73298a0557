"""Every theorem of `masknorm prove` has a numerical test of the torch implementation, found by its
name: a test function in tests/impl, tests/modules or tests/fast decorated with
`@pytest.mark.theorem("<name>")` (spec/CONTRACT.md lists them). The test sources are read with ast,
nothing is run. An *_expanded theorem states its base theorem again (explicit n), so a test of the
base theorem is its test."""

import ast
from pathlib import Path

from masknorm.proofs import theorems

TESTS = Path(__file__).resolve().parents[1]
NUMERICAL = ("impl", "modules", "fast")
EXPANDED_SUFFIX = "_expanded"


def _theorem_name(decorator: ast.expr) -> str | None:
    """The name in a `pytest.mark.theorem("<name>")` decorator, None for any other decorator."""
    if not (isinstance(decorator, ast.Call) and ast.unparse(decorator.func) == "pytest.mark.theorem"):
        return None
    assert len(decorator.args) == 1 and not decorator.keywords and isinstance(decorator.args[0], ast.Constant), \
        f"theorem marks take one literal name: {ast.unparse(decorator)}"
    return decorator.args[0].value


def tagged() -> list[tuple[str, Path, str]]:
    """(theorem name, test file, test function) for every theorem mark under tests/."""
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found += [(name, path, node.name) for name in map(_theorem_name, node.decorator_list) if name]
    return found


def _base(name: str) -> str:
    return name.removesuffix(EXPANDED_SUFFIX)


def test_every_theorem_has_a_tagged_numerical_test():
    numerical = {name for name, path, _ in tagged() if path.relative_to(TESTS).parts[0] in NUMERICAL}
    missing = [t.name for t in theorems.THEOREMS + theorems.EXPANDED if _base(t.name) not in numerical]
    assert not missing, f"theorems with no @pytest.mark.theorem test in tests/{{{','.join(NUMERICAL)}}}: {missing}"


def test_every_tag_names_a_theorem_on_a_numerical_test():
    names = {t.name for t in theorems.THEOREMS + theorems.EXPANDED}
    for name, path, function in tagged():
        where = f"{path.relative_to(TESTS)}::{function}"
        assert name in names, f"{where} is tagged with {name!r}, which `masknorm prove` does not prove"
        assert function.startswith("test_") and path.relative_to(TESTS).parts[0] in NUMERICAL, \
            f"{where}: theorem marks go on test functions of tests/{{{','.join(NUMERICAL)}}}"


def test_the_expanded_theorems_have_a_base_theorem():
    bases = {t.name for t in theorems.THEOREMS}
    assert all(_base(t.name) in bases for t in theorems.EXPANDED)
