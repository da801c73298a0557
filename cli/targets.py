"""MODULE:CALLABLE targets of `masknorm check` and `masknorm invariance`, imported without torch or the
verification extras (the invariance check runs on torch alone)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable


class UsageError(Exception):
    """A problem with the command line or the target, reported with exit status 2."""


def load(target: str) -> Callable[..., Any]:
    """The object named by "module:attr[.attr...]", importing module from the current directory
    or PYTHONPATH; UsageError saying why when that fails."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected MODULE:CALLABLE, got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is reported as the reason
        raise UsageError(f"cannot import {module_name!r}: {type(err).__name__}: {err}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{target} is a {type(obj).__name__}, not callable")
    return obj
