"""masknorm's test oracle for other implementations: check(fn, Semantics(...)) -> Report.

Each property is a hypothesis test (max_examples=examples, no database, derandomized or seeded) whose
body calls fn on one drawn example and measures it against the mpmath reference; hypothesis shrinks a
failure to a minimal example, which the Report gives back as runnable code.

    pass  <=>  error <= bound (u*kappa, see masknorm.reference.oracle.properties) and no exception, NaN or dtype change
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from masknorm._contract import normalize_dims

from ..error import unit_roundoff
from .bias import estimates, summary, verdict
from .engine import controlled
from .frameworks import Framework, detect, framework
from .properties import (
    FORWARD_BOUND,
    GRADIENT_BOUND,
    Caller,
    Outcome,
    WrongOutput,
    measure_dtype_shape,
    measure_forward,
    measure_gradient,
    measure_padding_forward,
    measure_padding_gradient,
    raised,
)
from .report import PropertyResult, Report, reproduction
from .semantics import Semantics
from .strategies import (
    DTYPES,
    MaskedInput,
    Sides,
    mask_shape,
    masked_inputs,
    ranks,
    side_ranges,
    upstream_gradients,
    with_garbage,
)

Dim = Union[int, Sequence[int]]
EXAMPLES = 100  # per property
SHRINKS = 100  # successful shrinks per failing property (deterministic, unlike a time limit)


@dataclass(frozen=True)
class _Case:
    """One example of a property: the input, the upstream gradient (gradient properties), and the
    same input with its padding clean (padding properties: `inp` holds garbage there)."""

    inp: MaskedInput
    grad_out: Optional[torch.Tensor] = None
    clean: Optional[MaskedInput] = None


Measure = Callable[[_Case], Outcome]


class CallError(Exception):
    """fn cannot be called at all: it raised, or returned something other than an array, on a plain input."""


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
    samples: Optional[list] = None  # each call's Outcome.groups (bias.py), kept by `measure`


@dataclass
class _Clock:
    """Progress over the whole check: examples done of those planned, and an estimate of the rest."""

    planned: int
    progress: Callable[[str], None]
    done: int = 0
    start: float = field(default_factory=time.perf_counter)

    def tick(self, line: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * max(self.planned - self.done, 0)
        self.progress(f"{line} ({elapsed:.0f} s, about {left:.0f} s left)")


def _target(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _plain_input(
    sem: Semantics, rank: int, sides: Sides, mask_dims: Optional[Dim], mask: bool, dtype: torch.dtype, smallest: int
) -> MaskedInput:
    """Sides at their smallest allowed value >= 3 (the largest on the reduced axes when that leaves
    groups of fewer than `smallest` positions), values 1..n, all valid."""
    ranges = side_ranges(rank, sides)
    dims = normalize_dims(sem.dim, rank)
    shape = tuple(min(max(3, low), high) for low, high in ranges)
    if int(np.prod([shape[d] for d in dims])) < smallest:
        shape = tuple(ranges[d][1] if d in dims else side for d, side in enumerate(shape))
    count = int(np.prod(shape))
    x = torch.arange(1, count + 1, dtype=torch.float64).reshape(shape).to(dtype)
    m = torch.ones(mask_shape(shape, mask_dims), dtype=torch.bool) if mask else None
    return MaskedInput(x, m, dims)


def _check_segments(
    sem: Semantics, mask: bool, mask_dims: Optional[Dim], ndim: Optional[int], sides: Sides, framework_name: Optional[str]
) -> None:
    """ValueError unless segments can be cut: a mask over x's leading axes (0, ..., j), the rest
    feature axes, on a torch callable (and a claim of masked="keep": the padding keeps x)."""
    if not mask or mask_dims is None:
        raise ValueError("segments needs a mask and mask_dims (the leading axes the mask covers, e.g. (0, 1))")
    if framework_name not in (None, "torch"):
        raise ValueError(f"segments: only torch callables take fn(x_nodes, batch) here, not {framework_name}")
    if sem.masked != "keep":
        raise ValueError(f"segments: the padding keeps x, so claim masked='keep' (got masked={sem.masked!r})")
    for rank in ranks(sem.dim, ndim if sides is None else len(sides), mask_dims):
        axes = normalize_dims(mask_dims, rank)
        if axes != tuple(range(len(axes))):
            raise ValueError(f"segments: mask_dims must be x's leading axes (0, ..., j), got {mask_dims!r} for rank {rank}")


def _largest_group(sem: Semantics, ndim: Optional[int], sides: Sides, mask_dims: Optional[Dim]) -> int:
    """The most positions a group of a drawable shape can hold (over the ranks x may have)."""
    sizes = []
    for rank in ranks(sem.dim, ndim if sides is None else len(sides), mask_dims):
        ranges = side_ranges(rank, sides)
        sizes.append(int(np.prod([ranges[d][1] for d in normalize_dims(sem.dim, rank)])))
    return max(sizes)


def _smoke(caller: Caller, inp: MaskedInput) -> None:
    """Call fn once on a plain input; CallError when that fails."""
    try:
        caller.forward(inp)
    except WrongOutput as err:
        raise CallError(f"fn must return a {caller.framework.array_type}: it {err}") from err
    except Exception as err:  # noqa: BLE001 - reported as the reason fn cannot be checked
        call = "fn(x)" if inp.mask is None else "fn(x_nodes, batch)" if caller.segments else "fn(x, mask)"
        raise CallError(f"{call} on {caller.framework.name} x of shape {tuple(inp.x.shape)} {raised(err)}") from err


def _detect(fn: Callable[..., Any], inp: MaskedInput, mask_arg: Callable[[MaskedInput], Any]) -> str:
    """fn's framework: torch when it maps torch input to a torch tensor, else what it returns for
    numpy input (numpy, or jax for JAX functions, which take numpy arrays); torch when neither, so
    that the smoke call says what went wrong."""
    for name, accepted in (("torch", ("torch",)), ("numpy", ("numpy", "jax"))):
        fw = framework(name)
        m = mask_arg(inp)
        try:
            with warnings.catch_warnings():  # a trial call (a numpy fn on torch tensors): its warnings are noise
                warnings.simplefilter("ignore")
                out = fn(fw.to_native(inp.x)) if m is None else fn(fw.to_native(inp.x), fw.to_native(m))
        except Exception:  # noqa: BLE001 - try the next framework
            continue
        if detect(out) in accepted:
            return detect(out)
    return "torch"


def _properties(caller: Caller, sem: Semantics, grad: bool, mask: bool, **draw: Any) -> List[_Property]:
    """The properties checked, in the report's order (the systematic-error result follows the forward
    property's); the padding properties are skipped without a mask, and with segments, where fn
    never sees the padding."""
    def inputs(**edges: bool) -> st.SearchStrategy:
        return masked_inputs(sem.dim, mask=mask, **draw, **edges)

    def with_grad(cases: st.SearchStrategy, zero_padding: bool = False) -> st.SearchStrategy:
        return cases.flatmap(lambda c: upstream_gradients(c.inp, zero_padding=zero_padding).map(lambda g: _Case(c.inp, g, c.clean)))

    def forward(case: _Case) -> Outcome:
        outcome = measure_forward(caller, sem, case.inp, regular_only=True)
        forward_samples.append(outcome.groups)
        return outcome

    forward_samples: List[Optional[np.ndarray]] = []
    plain = inputs().map(_Case)
    padded = inputs(padded=True, degenerate=True).flatmap(lambda clean: with_garbage(clean).map(lambda i: _Case(i, None, clean)))
    no_mask = None if mask else "no mask"
    if caller.segments:
        no_mask = "segments: fn never sees the padding"
    no_grad = None if grad else "grad=False"
    if grad and caller.framework.vjp is None:
        no_grad = f"{caller.framework.name} has no autodiff"
    return [
        _Property("forward vs reference", plain, forward, FORWARD_BOUND, samples=forward_samples),
        _Property(
            "padding garbage", padded, lambda c: measure_padding_forward(caller, sem, c.inp, c.clean), FORWARD_BOUND, no_mask
        ),
        _Property(
            "degenerate groups",
            inputs(degenerate=True).map(_Case),
            lambda c: measure_forward(caller, sem, c.inp, degenerate_only=True),
            FORWARD_BOUND,
        ),
        _Property(
            "gradient vs reference",
            with_grad(inputs(degenerate=True).map(_Case)),
            lambda c: measure_gradient(caller, sem, c.inp, c.grad_out),
            GRADIENT_BOUND,
            no_grad,
        ),
        _Property(
            "gradient padding garbage",
            with_grad(padded, zero_padding=True),
            lambda c: measure_padding_gradient(caller, sem, c.inp, c.clean, c.grad_out),
            GRADIENT_BOUND,
            no_grad or no_mask,
        ),
        _Property("dtype and shape", plain, lambda c: measure_dtype_shape(caller, c.inp), None),
    ]


def _severity(outcome: Outcome) -> float:
    """How bad an outcome is, for keeping the worst example: a problem (exception, NaN) counts as inf."""
    return float("inf") if outcome.problem is not None else outcome.error


def _run(
    prop: _Property, target: str, sem: Semantics, caller: Caller, examples: int, seed: Optional[int], clock: _Clock,
    shrinks: int,
) -> PropertyResult:
    """Run one property as a hypothesis test; on failure keep the last failing example hypothesis
    replays, which is the shrunk one, and the worst example seen."""
    if prop.skipped:
        return PropertyResult(prop.name, "skipped", reason=prop.skipped)
    seen: dict = {"calls": 0, "worst": 0.0, "failure": None, "worst_case": None}
    started = time.perf_counter()

    # derandomized, hypothesis seeds the examples from body's source: editing it changes every example
    def body(case: _Case) -> None:
        outcome = prop.measure(case)
        seen["calls"] += 1
        seen["worst"] = max(seen["worst"], outcome.error)
        stage = "shrinking the counterexample" if seen["failure"] else f"example {seen['calls']}/{examples}"
        clock.tick(f"{prop.name}: {stage}")
        if outcome.problem is not None or (prop.bound is not None and outcome.error > prop.bound):
            seen["failure"] = (case, outcome)
            if seen["worst_case"] is None or _severity(outcome) > _severity(seen["worst_case"][1]):
                seen["worst_case"] = (case, outcome)
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
        with controlled(shrinks):
            test()
    except Exception:
        if seen["failure"] is None:
            raise
    seconds = time.perf_counter() - started
    worst = seen["worst"] if prop.bound is not None else None
    result = PropertyResult(prop.name, "pass", seen["calls"], worst, prop.bound, seconds=seconds)
    if seen["failure"] is None:
        return result
    result.status = "fail"
    result.reason = _reason(prop, seen["failure"][1])
    result.reproduction = _reproduction(target, sem, caller, prop, seen["failure"], result.reason)
    if seen["worst_case"] is not None and seen["worst_case"][0] is not seen["failure"][0]:
        result.worst_reason = _reason(prop, seen["worst_case"][1])
        result.worst_reproduction = _reproduction(target, sem, caller, prop, seen["worst_case"], result.worst_reason)
    return result


def _systematic(forward: _Property, result: PropertyResult, sem: Semantics, dtype: torch.dtype, extreme: bool) -> PropertyResult:
    """The bias test over the forward property's generated draws (bias.py): fails when the output's
    scale or the subtracted mean is off by a consistent relative amount; skipped where the forward
    property (`result`) failed (its later calls are shrinking one example, and its error is the
    finding), so that every call's samples are generated draws."""
    name = "systematic error"
    if extreme:
        return PropertyResult(name, "skipped", reason="extreme magnitudes (rounding is not relative among subnormals)")
    if result.status == "fail":
        return PropertyResult(name, "skipped", reason=f"{forward.name} fails")
    samples = [s for s in forward.samples or [] if s is not None]
    found = estimates(samples, sem.center, sem.correction, dtype)
    reason = verdict(found, unit_roundoff(dtype))
    return PropertyResult(
        name, "fail" if reason else "pass", len(samples), reason=reason, detail=summary(found),
        estimates=[e.to_dict() for e in found],
    )


def _reason(prop: _Property, outcome: Outcome) -> str:
    return outcome.problem or f"error {outcome.error:.3g} u*kappa > bound {prop.bound:g}"


def _reproduction(target: str, sem: Semantics, caller: Caller, prop: _Property, seen: Tuple, reason: str) -> str:
    case, outcome = seen
    note = f"{prop.name}: {reason} (claimed: {sem.describe()})"
    return reproduction(
        target, case.inp.x, caller.mask_arg(case.inp), outcome.expected, grad_out=case.grad_out, note=note,
        framework=caller.framework, x_clean=None if case.clean is None else case.clean.x, segments=caller.segments,
    )


def check(
    fn: Callable[..., Any],
    semantics: Semantics = Semantics(),
    *,
    ndim: Optional[int] = None,
    mask_dims: Optional[Dim] = None,
    mask: bool = True,
    squeeze_mask: bool = False,
    segments: bool = False,
    grad: bool = False,
    dtype: Union[str, torch.dtype] = "float64",
    examples: int = EXAMPLES,
    seed: Optional[int] = None,
    extreme: bool = False,
    min_group_size: int = 1,
    min_valid: int = 0,
    sides: Sides = None,
    framework_name: Optional[str] = None,
    jit: bool = True,
    shape_buckets: Optional[bool] = None,
    shrinks: int = SHRINKS,
    name: Optional[str] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Report:
    """Check fn(x, mask) (fn(x) when mask=False) against the reference for `semantics`: forward,
    systematic error over the forward draws (a bias of about 1 u and more, bias.py), garbage padding,
    degenerate groups, dtype and shape, and with grad=True its gradients by its
    framework's autodiff; `examples` hypothesis examples per property, the same every run unless
    `seed` is given. x has rank `ndim` (None: any that fits) and sides within `sides` (per axis: an
    int, a (low, high) range or None); the bool mask has x's rank and size 1 off `mask_dims` (None:
    it varies along every axis), or only the `mask_dims` axes with `squeeze_mask`. With `segments`
    fn is called as graph libraries' norms are, fn(x_nodes, batch): x_nodes = x[mask] (the valid
    positions in order, mask over the leading axes `mask_dims` = (0, ..., j)), batch their index
    along axis 0 (the graph), and fn's output goes back to those positions (torch callables; the
    padding keeps x, so claim masked="keep"). `extreme` draws
    magnitudes at the dtype's overflow/underflow thresholds; `min_group_size` is the smallest group
    fn accepts (torch's batch_norm and group_norm refuse groups of one value), counting every position;
    `min_valid` the fewest valid (mask True) positions it accepts in a group, a constraint on the
    drawn masks (a masked batch norm built on torch's refuses one valid value per channel; 0: none,
    so that empty groups are drawn). `framework_name`:
    "torch", "numpy", "jax" or "keras" (None: detected from what fn returns); `jit`: JAX calls fn
    and its VJP under jax.jit (else op by op); `shape_buckets`: draw only a few shapes per rank
    (strategies.bucket_shapes; None: for frameworks that compile per shape, JAX). Shrinking a
    counterexample stops after `shrinks` successful shrinks per property. CallError when fn cannot
    be called on a plain input."""
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    dtype_name = str(torch_dtype).removeprefix("torch.")
    if squeeze_mask and mask_dims is None:
        raise ValueError("squeeze_mask needs mask_dims (the axes the mask keeps)")
    if segments:
        _check_segments(semantics, mask, mask_dims, ndim, sides, framework_name)
        squeeze_mask, framework_name = True, "torch"
    if examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples}")
    for arg, value, least in (("min_group_size", min_group_size, 1), ("min_valid", min_valid, 0)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{arg} must be an int, got {value!r}")
        if value < least:
            raise ValueError(f"{arg} must be >= {least}, got {value}")
    smallest = max(min_group_size, min_valid)
    largest = _largest_group(semantics, ndim, sides, mask_dims)
    if smallest > largest:
        what = f"min_group_size={min_group_size}" if min_group_size >= min_valid else f"min_valid={min_valid}"
        raise ValueError(f"{what} exceeds the largest group the shapes allow ({largest} positions; see sides)")
    target = name or _target(fn)
    rank = ranks(semantics.dim, ndim if sides is None else len(sides), mask_dims)[0]
    plain = _plain_input(semantics, rank, sides, mask_dims, mask, torch_dtype, smallest)
    probe = Caller(fn, Framework(), semantics.padding_mask, squeeze_mask, mask_dims)
    fw = framework(framework_name or _detect(fn, plain, probe.mask_arg), jit)
    if dtype_name not in fw.dtypes:
        raise ValueError(f"dtype {dtype_name} is not available in {fw.name} (it has {', '.join(fw.dtypes)})")
    if hasattr(fw, "enable"):
        fw.enable(dtype_name)
    caller = Caller(fn, fw, semantics.padding_mask, squeeze_mask, mask_dims, segments)
    _smoke(caller, plain)
    buckets = fw.shape_buckets if shape_buckets is None else shape_buckets
    props = _properties(
        caller, semantics, grad, mask, ndim=ndim, mask_dims=mask_dims, dtype=torch_dtype, min_group_size=min_group_size,
        min_valid=min_valid, extreme=extreme, sides=sides, shape_buckets=buckets,
    )
    report = Report(target, "")
    clock = _Clock(examples * sum(p.skipped is None for p in props), progress or (lambda _: None))
    for prop in props:
        report.properties.append(_run(prop, target, semantics, caller, examples, seed, clock, shrinks))
        if prop.samples is not None:
            report.properties.append(_systematic(prop, report.properties[-1], semantics, torch_dtype, extreme))
    mask_text = "none" if not mask else "varies along " + ("every axis" if mask_dims is None else f"axes {mask_dims}")
    report.setup = (
        f"semantics: {semantics.describe()}; framework={fw.describe()}, dtype={dtype_name}, ndim={ndim}, sides={sides}, "
        f"shapes={'buckets' if buckets else 'all'}, mask={mask_text}"
        f"{' (segments: fn(x_nodes, batch))' if segments else ' (squeezed)' if squeeze_mask else ''}, "
        f"{f'min_valid={min_valid}, ' if min_valid else ''}grad={grad}, extreme={extreme}, examples={examples}, seed={seed}"
    )
    return report


def assert_conforms(fn: Callable[..., Any], semantics: Semantics = Semantics(), **options: Any) -> Report:
    """check(fn, semantics, **options); raise ConformanceError (an AssertionError holding the report)
    when a property fails, else return the report."""
    report = check(fn, semantics, **options)
    if not report.conforms:
        raise ConformanceError(report)
    return report
