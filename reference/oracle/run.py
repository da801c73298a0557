"""masknorm's test oracle for other implementations: check(fn, Semantics(...)) -> Report.

Each property is a hypothesis test (max_examples=examples, no database, derandomized or seeded) whose
body calls fn on one drawn example and measures it against the mpmath reference; hypothesis shrinks a
failure to a minimal example, which the Report gives back as runnable code.

    pass  <=>  error <= bound (u*kappa, see masknorm.reference.oracle.properties) and no exception, NaN or dtype change
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from masknorm._contract import normalize_dims

from .properties import (
    FORWARD_BOUND,
    GRADIENT_BOUND,
    Outcome,
    call,
    measure_dtype_shape,
    measure_forward,
    measure_gradient,
    raised,
)
from .report import PropertyResult, Report, reproduction
from .semantics import Semantics
from .strategies import DTYPES, MaskedInput, mask_shape, masked_inputs, ranks, upstream_gradients

Dim = Union[int, Sequence[int]]
Measure = Callable[[MaskedInput, Optional[torch.Tensor]], Outcome]


class CallError(Exception):
    """fn cannot be called at all: it raised, or returned something other than a tensor, on a plain input."""


class ConformanceError(AssertionError):
    """Raised by assert_conforms; `report` holds the Report."""

    def __init__(self, report: Report) -> None:
        super().__init__(str(report))
        self.report = report


class _Violation(Exception):
    """Raised inside a property's hypothesis test when an example fails."""


@dataclass(frozen=True)
class _Property:
    name: str
    cases: st.SearchStrategy
    measure: Measure
    bound: Optional[float]
    skipped: Optional[str] = None


def _target(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _smoke(
    fn: Callable[..., Any], sem: Semantics, ndim: Optional[int], mask_dims: Optional[Dim], mask: bool, dtype: torch.dtype
) -> None:
    """Call fn once on a plain input (sides 3, values 1..n, all valid); CallError when that fails."""
    rank = ranks(sem.dim, ndim, mask_dims)[0]
    shape = (3,) * rank
    x = torch.arange(1, 3**rank + 1, dtype=torch.float64).reshape(shape).to(dtype)
    m = torch.ones(mask_shape(shape, mask_dims), dtype=torch.bool) if mask else None
    try:
        out = call(fn, MaskedInput(x, m, normalize_dims(sem.dim, rank)))
    except Exception as err:  # noqa: BLE001 - reported as the reason fn cannot be checked
        raise CallError(f"{'fn(x)' if m is None else 'fn(x, mask)'} on x of shape {shape} {raised(err)}") from err
    if not isinstance(out, torch.Tensor):
        raise CallError(f"fn must return a torch.Tensor, got {type(out).__name__}")


def _properties(fn: Callable[..., Any], sem: Semantics, grad: bool, mask: bool, **draw: Any) -> List[_Property]:
    def plain(**edges: bool) -> st.SearchStrategy:
        return masked_inputs(sem.dim, mask=mask, **draw, **edges).map(lambda inp: (inp, None))

    def with_grad(zero_padding: bool, **edges: bool) -> st.SearchStrategy:
        inputs = masked_inputs(sem.dim, mask=mask, **draw, **edges)
        return inputs.flatmap(lambda inp: upstream_gradients(inp, zero_padding=zero_padding).map(lambda g: (inp, g)))

    no_mask = None if mask else "no mask"
    no_grad = None if grad else "grad=False"
    return [
        _Property("forward vs reference", plain(), lambda i, _: measure_forward(fn, sem, i, regular_only=True), FORWARD_BOUND),
        _Property(
            "padding garbage",
            plain(garbage=True, degenerate=True),
            lambda i, _: measure_forward(fn, sem, i, valid_only=True),
            FORWARD_BOUND,
            no_mask,
        ),
        _Property(
            "degenerate groups", plain(degenerate=True), lambda i, _: measure_forward(fn, sem, i), FORWARD_BOUND
        ),
        _Property(
            "gradient vs reference",
            with_grad(False, degenerate=True),
            lambda i, g: measure_gradient(fn, sem, i, g),
            GRADIENT_BOUND,
            no_grad,
        ),
        _Property(
            "gradient padding garbage",
            with_grad(True, garbage=True, degenerate=True),
            lambda i, g: measure_gradient(fn, sem, i, g),
            GRADIENT_BOUND,
            no_grad or no_mask,
        ),
        _Property("dtype and shape", plain(), lambda i, _: measure_dtype_shape(fn, i), None),
    ]


def _run(
    prop: _Property, target: str, sem: Semantics, examples: int, seed: Optional[int], progress: Callable[[str], None]
) -> PropertyResult:
    """Run one property as a hypothesis test; on failure keep the last failing example hypothesis
    replays, which is the shrunk one."""
    if prop.skipped:
        return PropertyResult(prop.name, "skipped", reason=prop.skipped)
    seen = {"calls": 0, "worst": 0.0, "failure": None}

    def body(case):
        inp, grad_out = case
        outcome = prop.measure(inp, grad_out)
        seen["calls"] += 1
        seen["worst"] = max(seen["worst"], outcome.error)
        stage = "shrinking the counterexample" if seen["failure"] else f"example {seen['calls']}/{examples}"
        progress(f"{prop.name}: {stage}")
        if outcome.problem is not None or (prop.bound is not None and outcome.error > prop.bound):
            seen["failure"] = (inp, grad_out, outcome)
            raise _Violation

    test = settings(
        max_examples=examples,
        derandomize=seed is None,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        verbosity=Verbosity.quiet,
        print_blob=False,
    )(given(prop.cases)(body))
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    try:
        test()
    except Exception:
        if seen["failure"] is None:
            raise
    result = PropertyResult(prop.name, "pass", seen["calls"], seen["worst"] if prop.bound is not None else None, prop.bound)
    if seen["failure"] is None:
        return result
    inp, grad_out, outcome = seen["failure"]
    result.status = "fail"
    result.reason = outcome.problem or f"error {outcome.error:.3g} u*kappa > bound {prop.bound:g}"
    note = f"{prop.name}: {result.reason} (claimed: {sem.describe()})"
    result.reproduction = reproduction(target, inp.x, inp.mask, outcome.expected, grad_out=grad_out, note=note)
    return result


def check(
    fn: Callable[..., Any],
    semantics: Semantics = Semantics(),
    *,
    ndim: Optional[int] = None,
    mask_dims: Optional[Dim] = None,
    mask: bool = True,
    grad: bool = False,
    dtype: Union[str, torch.dtype] = "float64",
    examples: int = 100,
    seed: Optional[int] = None,
    extreme: bool = False,
    min_group_size: int = 1,
    name: Optional[str] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Report:
    """Check fn(x, mask) (fn(x) when mask=False) against the reference for `semantics`: forward,
    garbage padding, degenerate groups, dtype and shape, and with grad=True its autograd gradients;
    `examples` hypothesis examples per property. x has rank `ndim` (None: any that fits), the bool
    mask has x's rank and size 1 off `mask_dims` (None: it varies along every axis); `extreme` draws
    magnitudes at the dtype's overflow/underflow thresholds; `min_group_size` is the smallest group
    fn accepts (torch's batch_norm and group_norm refuse groups of one value). CallError when fn
    cannot be called on a plain input."""
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    target = name or _target(fn)
    _smoke(fn, semantics, ndim, mask_dims, mask, torch_dtype)
    props = _properties(
        fn, semantics, grad, mask,
        ndim=ndim, mask_dims=mask_dims, dtype=torch_dtype, min_group_size=min_group_size, extreme=extreme,
    )
    setup = (
        f"semantics: {semantics.describe()}; dtype={str(torch_dtype).removeprefix('torch.')}, ndim={ndim}, "
        f"mask={'none' if not mask else 'varies along ' + ('every axis' if mask_dims is None else f'axes {mask_dims}')}, "
        f"grad={grad}, extreme={extreme}, examples={examples}, seed={seed}"
    )
    report = Report(target, setup)
    for prop in props:
        report.properties.append(_run(prop, target, semantics, examples, seed, progress or (lambda _: None)))
    return report


def assert_conforms(fn: Callable[..., Any], semantics: Semantics = Semantics(), **options: Any) -> Report:
    """check(fn, semantics, **options); raise ConformanceError (an AssertionError holding the report)
    when a property fails, else return the report."""
    report = check(fn, semantics, **options)
    if not report.conforms:
        raise ConformanceError(report)
    return report
