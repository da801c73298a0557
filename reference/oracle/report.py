"""The oracle's findings: one result per property, and reproductions as runnable Python.

    Report.conforms = no property failed;  a failure carries its shrunk counterexample as code
"""

from __future__ import annotations

import math
import os
import re
import site
import sys
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import torch

from .frameworks import Framework

_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


@dataclass
class PropertyResult:
    """One property's verdict: status "pass", "fail" or "skipped"; `calls` counts the examples fn
    was called on (shrinking included), `worst` is the largest error seen (u*kappa), `reason` says
    why it failed or was skipped, `reproduction` is code for the shrunk counterexample and
    `worst_reproduction` for the worst example seen, when that is another one (a shrunk example
    sits just past the bound; the worst shows how bad it gets), `seconds` the time it took, `detail`
    what was measured beside the worst error, in words, and `estimates` as data (the systematic-error
    estimates: bias.Estimate's fields and whether each is flagged)."""

    name: str
    status: str
    calls: int = 0
    worst: Optional[float] = None
    bound: Optional[float] = None
    reason: Optional[str] = None
    reproduction: Optional[str] = None
    worst_reproduction: Optional[str] = None
    worst_reason: Optional[str] = None
    seconds: float = 0.0
    detail: Optional[str] = None
    estimates: Optional[List[dict]] = None


@dataclass
class Report:
    """Every property's result for one implementation (`target`) and configuration (`setup`)."""

    target: str
    setup: str
    properties: List[PropertyResult] = field(default_factory=list)

    @property
    def conforms(self) -> bool:
        """True when no property failed."""
        return all(p.status != "fail" for p in self.properties)

    @property
    def failed(self) -> List[PropertyResult]:
        """The properties that failed."""
        return [p for p in self.properties if p.status == "fail"]

    def to_dict(self) -> dict:
        """The report as JSON-ready data (an infinite error is written as the string "inf")."""
        props = [{k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(p).items()} for p in self.properties]
        return {"target": self.target, "setup": self.setup, "conforms": self.conforms, "properties": props}

    def __str__(self) -> str:
        lines = [f"masknorm check {self.target}", f"  {self.setup}", ""]
        lines.append(f"{'property':<26} {'calls':>8} {'worst u*kappa':>14} {'bound':>6} {'seconds':>8}  result")
        for p in self.properties:
            worst = "-" if p.worst is None else f"{p.worst:.3g}"
            bound = "-" if p.bound is None else f"{p.bound:g}"
            result = p.status.upper() if p.status == "fail" else p.status
            if p.status == "skipped":
                result += f" ({p.reason})"
            elif p.detail:
                result += f" ({p.detail})"
            lines.append(f"{p.name:<26} {p.calls:>8} {worst:>14} {bound:>6} {p.seconds:>8.1f}  {result}")
        for p in self.failed:
            lines += ["", f"FAIL {p.name}: {p.reason}"]
            if p.reproduction:
                lines += ["shrunk counterexample:"] + ["    " + line for line in p.reproduction.splitlines()]
            if p.worst_reproduction:
                lines += [f"worst example seen ({p.worst_reason}):"]
                lines += ["    " + line for line in p.worst_reproduction.splitlines()]
        verdict = "conforms" if self.conforms else f"does NOT conform ({len(self.failed)} failed)"
        lines += ["", f"{self.target} {verdict}"]
        return "\n".join(lines)


def _number(v: float) -> str:
    if math.isnan(v):
        return 'float("nan")'
    if math.isinf(v):
        return 'float("inf")' if v > 0 else '-float("inf")'
    return repr(v)


def literal(values: Any) -> str:
    """A Python literal of nested lists holding exactly the values of a tensor or array (floats as
    shortest round-trip reprs, non-finite as float("...") calls; bools as True/False)."""
    items = values.tolist() if hasattr(values, "tolist") else values
    if isinstance(items, list):
        return "[" + ", ".join(literal(v) for v in items) + "]"
    if isinstance(items, bool):
        return repr(items)
    return _number(float(items))


def _site_folders() -> set:
    """The folders installed packages are imported from (a module there imports from anywhere)."""
    folders = set(site.getsitepackages()) | {site.getusersitepackages()}
    folders |= {sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib", "platstdlib")}
    return {os.path.abspath(f) for f in folders}


def import_folder(module: str) -> Optional[str]:
    """The folder to put on sys.path so that `module` (already imported) imports from anywhere as
    it did here: the folder its top-level package sits in; None when it is not a file, when it sits
    in site-packages or the standard library (importable anywhere already), or when its file is not
    where its name says (an editable install's mapping, which its own finder resolves)."""
    file = getattr(sys.modules.get(module), "__file__", None)
    if not file or module == "__main__":
        return None
    path = Path(os.path.abspath(file))
    parts = module.split(".")
    root = path.parents[len(parts) - 1 + (path.name == "__init__.py")]
    where = root.joinpath(*parts)
    if path not in (where.with_name(where.name + path.suffix), where / "__init__.py") or str(root) in _site_folders():
        return None
    return str(root)


def import_code(target: str) -> str:
    """The lines that bind the callable under test to `fn`, from "module:qualname[.attr...]":
    with sys.path extended by import_folder(module) when the module was imported from a folder of
    its own (the current directory of `masknorm check`, say), so that the code runs when saved and
    run from any other folder."""
    module, _, name = target.partition(":")
    if not name or "<" in name or module == "__main__":
        return f"fn = ...  # the callable under test: {target}"
    first, _, rest = name.partition(".")
    lines = []
    folder = import_folder(module)
    if folder is not None:
        lines += ["import sys", f"sys.path.insert(0, {folder!r})  # where {module} was imported from by the check"]
    lines += [f"from {module} import {first} as fn"] if not rest else [f"from {module} import {first}", f"fn = {first}.{rest}"]
    return "\n".join(lines)


def comment(text: str) -> List[str]:
    """`text` as Python comment lines: every line commented, terminal escape sequences removed
    (a multi-line exception message must not break the code it annotates)."""
    plain = _ESCAPES.sub("", text)
    return ["# " + line if line.strip() else "#" for line in plain.splitlines() or [""]]


def reproduction(
    target: str,
    x: torch.Tensor,
    mask: Optional[torch.Tensor],
    expected: Optional[np.ndarray],
    *,
    grad_out: Optional[torch.Tensor] = None,
    note: str,
    framework: Optional[Framework] = None,
    x_clean: Optional[torch.Tensor] = None,
    segments: bool = False,
) -> str:
    """Code that rebuilds a counterexample in fn's framework (torch by default), calls fn as the
    check did and prints the result beside `expected` (the output, or the gradient when `grad_out`
    is given; None when not a value check): the reference's, or with `x_clean` fn's own at x_clean
    (x with clean padding). `mask` is the mask as fn receives it; with `segments` (torch) fn gets
    x[mask] and the batch vector, and the output, gradient and expected values are at x[mask]."""
    fw = framework or Framework()
    dtype = str(x.dtype).removeprefix("torch.")
    args = "x" if mask is None else "x, mask"
    lines = [*fw.backend_code(), *fw.preamble(dtype), import_code(target), ""]
    lines.append(fw.code("x", literal(x.detach().cpu().double()), dtype, grad=grad_out is not None))
    if mask is not None:
        lines.append(fw.code("mask", literal(mask.cpu()), None))
    if segments:
        lines += ["x_nodes = x[mask]  # the valid positions, in order", "batch = mask.nonzero()[:, 0]  # their graph: index along axis 0"]
        expected = None if expected is None else expected[mask.numpy()]
    if grad_out is None:
        lines += ["out = fn(x_nodes, batch)" if segments else f"out = {fw.call_code(args)}", "print(out)"]
    elif segments:
        lines += [fw.code("grad_out", literal(grad_out.cpu().double()), dtype)]
        lines += ["fn(x_nodes, batch).backward(grad_out[mask])", "print(x.grad[mask])"]
    else:
        lines += [fw.code("grad_out", literal(grad_out.cpu().double()), dtype), *fw.gradient_code(args)]
    if expected is not None:
        what = ("gradient" if grad_out is not None else "output") + (" at x[mask]" if segments else "")
        if x_clean is None:
            what += " (reference VJP)" if grad_out is not None else ""
            lines.append(f"# expected {what}, masknorm.reference at 50 digits rounded once to float64:")
        else:
            lines.append(fw.code("x_clean", literal(x_clean.detach().cpu().double()), dtype))
            lines.append(f"# expected {what}: fn's own at x_clean (the padding clean), which garbage must not change:")
        lines.append(f"expected = {literal(expected)}")
    lines += comment(note)
    return "\n".join(lines)
