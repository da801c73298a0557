"""The oracle's findings: one result per property, and reproductions as runnable Python.

    Report.conforms = no property failed;  a failure carries its shrunk counterexample as code
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, List, Optional

import numpy as np
import torch


@dataclass
class PropertyResult:
    """One property's verdict: status "pass", "fail" or "skipped"; `calls` counts the examples fn
    was called on (shrinking included), `worst` is the largest error seen (u*kappa), `reason` says
    why it failed or was skipped, `reproduction` is code for the shrunk counterexample."""

    name: str
    status: str
    calls: int = 0
    worst: Optional[float] = None
    bound: Optional[float] = None
    reason: Optional[str] = None
    reproduction: Optional[str] = None


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
        lines.append(f"{'property':<26} {'calls':>8} {'worst u*kappa':>14} {'bound':>6}  result")
        for p in self.properties:
            worst = "-" if p.worst is None else f"{p.worst:.3g}"
            bound = "-" if p.bound is None else f"{p.bound:g}"
            result = p.status.upper() if p.status == "fail" else p.status
            if p.status == "skipped":
                result += f" ({p.reason})"
            lines.append(f"{p.name:<26} {p.calls:>8} {worst:>14} {bound:>6}  {result}")
        for p in self.failed:
            lines += ["", f"FAIL {p.name}: {p.reason}", "shrunk counterexample:"]
            lines += ["    " + line for line in (p.reproduction or "").splitlines()]
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


def tensor_code(name: str, t: torch.Tensor, *, grad: bool = False) -> str:
    """`name = torch.tensor(<exact literal>, dtype=...)`: a line that rebuilds t exactly."""
    values = t.detach().cpu()
    if t.dtype == torch.bool:
        return f"{name} = torch.tensor({literal(values)})"
    extra = ", requires_grad=True" if grad else ""
    return f"{name} = torch.tensor({literal(values.double())}, dtype={t.dtype}{extra})"


def import_code(target: str) -> str:
    """The line that binds the callable under test to `fn`, from "module:qualname"."""
    module, _, name = target.partition(":")
    if not name or "<" in name or "." in name:
        return f"fn = ...  # the callable under test: {target}"
    return f"from {module} import {name} as fn"


def reproduction(
    target: str,
    x: torch.Tensor,
    mask: Optional[torch.Tensor],
    expected: Optional[np.ndarray],
    *,
    grad_out: Optional[torch.Tensor] = None,
    note: str,
) -> str:
    """Code that rebuilds a counterexample, calls fn and prints the result beside `expected` (the
    reference's output, or its gradient when `grad_out` is given; None when not a value check)."""
    args = "x" if mask is None else "x, mask"
    lines = ["import torch", import_code(target), "", tensor_code("x", x, grad=grad_out is not None)]
    if mask is not None:
        lines.append(tensor_code("mask", mask))
    if grad_out is None:
        lines += [f"out = fn({args})", "print(out)"]
    else:
        lines += [tensor_code("grad_out", grad_out), f"fn({args}).backward(grad_out)", "print(x.grad)"]
    if expected is not None:
        what = "gradient (reference VJP)" if grad_out is not None else "output"
        lines.append(f"# expected {what}, masknorm.reference at 50 digits rounded once to float64:")
        lines.append(f"expected = torch.tensor({literal(expected)}, dtype=torch.float64)")
    lines.append(f"# {note}")
    return "\n".join(lines)
