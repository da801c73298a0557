"""An example run without its extra says which extra to install, instead of a raw ModuleNotFoundError."""

import importlib.util

from masknorm.examples import real_models


def test_real_models_without_transformers_names_the_models_extra(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real_find_spec(name, *a))
    assert real_models.main() == 2
    err = capsys.readouterr().err
    assert "needs transformers" in err and "pip install '.[models]'" in err
