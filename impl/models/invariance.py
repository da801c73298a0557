"""The model-level oracle: is a model padding-invariant? (masknorm.testing.check_padding_invariance)

A model is padding-invariant when the outputs at valid positions, and the parameter gradients of a
loss over them, do not depend on what lies beyond each sequence's length:

    eval:  each sequence alone (no padding)  ==  batched as given  ==  batched with a longer sequence
           ==  batched with garbage in the padding   (batch-mates change too: eval must not see them)
    train: batched as given  ==  padded further  ==  garbage in the padding
           (padding-only changes: train-mode batch norm depends on its batch-mates by design, so
            "alone" vs "batched" is batch invariance, which train mode does not promise)

The loss is sum(w * y) over valid outputs, w fixed per sequence, so in eval the batched gradient must
equal the sum of the alone gradients. Differences are relative to the largest magnitude in the reference
(`rtol`, default 1e4 u of the dtype: about 2e-12 in float64): outputs to the largest valid output of
any sequence, gradients to the largest gradient of any parameter (a sequence whose outputs are all 0,
a bias before a norm whose true gradient is 0, has no scale of its own). Forward hooks record every module's
output; the report names every module whose valid outputs change, in model order (named_modules) with
the size of the change, and the first in completion order (the innermost, where a leak starts). Scenarios
(`scenarios=`): "batched", "longer", "further", "garbage" (train runs further and garbage, eval the
others); one the model raises on (a model that requires T = the longest length cannot be padded
further) is skipped with the error as its note. Valid positions of internal outputs come from a masknorm.padding block around each
run with the lengths tracked through convolutions and pooling (masknorm/models/length_tracking.py); outputs whose
batch or time axis cannot be told are not compared. Runs are seeded alike; dropout must be off
(p = 0) for train mode to be comparable. Garbage is finite (N(0, 1e3)): NaN padding also breaks
attention (0 * NaN in probs @ V), a leak outside norms.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from masknorm.models import length_tracking
from masknorm.models.padding_context import Frame, current, label, padding, prefix_mask, time_axis

Forward = Callable[[nn.Module, torch.Tensor, torch.Tensor], Any]


def default_forward(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> Any:
    """model(x): the padding block around the call hands the mask to masknorm's norms."""
    del mask
    return model(x)


def first_tensor(out: Any) -> torch.Tensor:
    """The tensor a model's output stands for: itself, or the first tensor of a tuple / ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"the model's output ({type(out).__name__}) holds no tensor")


def valid_rows(y: torch.Tensor, frame: Frame, axes: Optional[Sequence[int]] = None) -> Optional[List[torch.Tensor]]:
    """Per sample, the values of y at its valid positions (flattened), or None if y's batch/time axes are unclear.

    The time axis is the one axis among `axes` (default: all after the batch) whose size the frame knows."""
    if y.dim() == 0 or y.shape[0] != frame.batch or not y.is_floating_point():
        return None
    axis, why = time_axis(frame, y.shape, range(1, y.dim()) if axes is None else axes)
    if why or (axis is None and y.dim() > 2):
        return None
    if axis is None:
        return [row.reshape(-1) for row in y]
    res = frame.resolution(y.shape[axis])
    if res.mask is None:
        return None
    rows = []
    for b in range(frame.batch):
        n = int(res.mask[b].sum())
        rows.append(y[b].narrow(axis - 1, 0, n).reshape(-1))
    return rows


@dataclass
class Run:
    """One forward+backward: per sample, valid outputs; per module, valid outputs; parameter gradients."""

    outputs: List[torch.Tensor]
    modules: List[Tuple[str, List[torch.Tensor]]]
    grads: Dict[str, torch.Tensor]


@dataclass
class Difference:
    """The largest relative difference of one comparison, and where it exceeds rtol: `modules` lists every
    module whose valid outputs change (model order) with its largest relative change; `skipped` is the
    error of a scenario the model raised on (then nothing was compared)."""

    scenario: str
    mode: str
    output: float
    gradient: float
    first_module: Optional[str] = None
    module_diff: float = 0.0
    first_parameter: Optional[str] = None
    ok: bool = True
    modules: List[Tuple[str, float]] = field(default_factory=list)
    skipped: Optional[str] = None


def rel(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """max |a - b| / scale (at least tiny); inf when shapes differ or anything is not finite."""
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    d = (a - b).abs().max()
    value = float(d) / max(scale, torch.finfo(b.dtype).tiny)
    return value if value == value else float("inf")


@dataclass
class InvarianceReport:
    """All comparisons; `ok` when every one is within rtol. str() is the readable report."""

    name: str
    rtol: float
    differences: List[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every comparison within rtol, and at least one scenario compared (not all skipped)."""
        return all(d.ok for d in self.differences) and any(d.skipped is None for d in self.differences)

    def __str__(self) -> str:
        lines = [f"padding invariance of {self.name}: {'PASS' if self.ok else 'FAIL'} (rtol {self.rtol:.1e})"]
        for d in self.differences:
            if d.skipped is not None:
                lines.append(f"  skip {d.mode:<5} {d.scenario:<44} the model raised: {d.skipped} (choose scenarios=)")
                continue
            mark = "ok  " if d.ok else "FAIL"
            line = f"  {mark} {d.mode:<5} {d.scenario:<44} outputs {d.output:.1e}  gradients {d.gradient:.1e}"
            if d.first_module:
                line += f"\n         first module whose output changes: {d.first_module} ({d.module_diff:.1e})"
            if d.modules:
                line += "\n         modules whose valid outputs change (model order):" + "".join(
                    f"\n           {name} ({diff:.1e})" for name, diff in d.modules)
            if d.first_parameter:
                line += f"\n         first parameter whose gradient changes: {d.first_parameter}"
            lines.append(line)
        return "\n".join(lines)


class _Runner:
    def __init__(self, model: nn.Module, forward: Forward, output: Callable[[Any], torch.Tensor], axis: int,
                 output_axis: int, seed: int) -> None:
        self.model, self.forward, self.output, self.axis, self.seed = model, forward, output, axis, seed
        self.output_axis = output_axis
        self.weights: Dict[int, torch.Tensor] = {}
        self.labels = {id(m): label(name, m) for name, m in model.named_modules()}
        self.order = {name: i for i, name in enumerate(self.labels.values())}

    def run(self, x: torch.Tensor, lengths: torch.Tensor, keys: Sequence[Optional[int]]) -> Run:
        """Forward+backward of x (padded along self.axis) with loss sum_b w[key_b] * valid(y_b) (key None: w = 0)."""
        buffers = {k: v.clone() for k, v in self.model.named_buffers()}
        self.model.zero_grad(set_to_none=True)
        mask = prefix_mask(lengths, x.shape[self.axis])
        records: List[Tuple[str, List[torch.Tensor]]] = []

        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            frame = current()
            tensor = out if isinstance(out, torch.Tensor) else None
            rows = None if tensor is None or frame is None else valid_rows(tensor, frame)
            if rows is not None:
                records.append((self.labels[id(module)], [r.detach() for r in rows]))

        torch.manual_seed(self.seed)
        with length_tracking.tracked(self.model), padding(mask=mask):
            handles = [m.register_forward_hook(hook) for m in self.model.modules()]
            try:
                y = self.output(self.forward(self.model, x, mask))
                rows = valid_rows(y, current(), [self.output_axis % y.dim()])
                records.append(("output", [] if rows is None else [r.detach() for r in rows]))
            finally:
                for h in handles:
                    h.remove()
        if rows is None:
            raise ValueError(f"cannot tell the valid positions of the model's output of shape {tuple(y.shape)}: "
                             f"its axis 0 must be the batch and its axis output_axis={self.output_axis} must have "
                             "the length of the input's time axis, or one the convolutions/pooling derive from it "
                             "(pass output_axis=, or output= to pick another tensor of the result)")
        loss = y.new_zeros(())
        for key, row in zip(keys, rows):
            if key is None:
                continue
            w = self.weights.setdefault(key, torch.randn(row.shape, generator=torch.Generator().manual_seed(key),
                                                         dtype=row.dtype).to(row.device))
            if w.shape != row.shape:
                raise ValueError(f"sequence {key} has {row.numel()} valid outputs here and {w.numel()} before")
            loss = loss + (w * row).sum()
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True) if loss.requires_grad else ()
        with torch.no_grad():
            for k, v in self.model.named_buffers():
                v.copy_(buffers[k])
        return Run([r.detach() for r in rows], records, {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in
                                   zip(params.items(), grads)})




def _scale(tensors: Any) -> float:
    """The largest magnitude in any of the tensors (0 if none)."""
    return max((float(t.abs().max()) for t in tensors if t.numel()), default=0.0)


Pair = Tuple[Tuple[Run, int], Tuple[Run, int]]


def _compare(pairs: Sequence[Pair], ref_grads: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor],
             scenario: str, mode: str, rtol: float, order: Dict[str, int]) -> Difference:
    """Row i of a reference run against row b of a variant run, for each pair; gradients by parameter."""
    scale = _scale(ref.outputs[i] for (ref, i), _ in pairs)
    out = max((rel(run.outputs[b], ref.outputs[i], scale) for (ref, i), (run, b) in pairs), default=0.0)
    diff = Difference(scenario, mode, out, 0.0)
    scale = _scale(ref_grads.values())
    for name, g in grads.items():
        d = rel(g, ref_grads[name], scale)
        diff.gradient = max(diff.gradient, d)
        if d > rtol and diff.first_parameter is None:
            diff.first_parameter = name
    diff.ok = out <= rtol and diff.gradient <= rtol
    if not diff.ok:
        changed = _changed_modules(pairs, rtol)
        if changed:
            diff.first_module, diff.module_diff = changed[0]
        worst: Dict[str, float] = {}
        for name, d in changed:
            worst[name] = max(worst.get(name, 0.0), d)
        diff.modules = sorted(worst.items(), key=lambda item: order.get(item[0], len(order)))
    return diff


def _changed_modules(pairs: Sequence[Pair], rtol: float) -> List[Tuple[str, float]]:
    """Each module call (in completion order) whose valid outputs differ between the runs of some pair, with
    the largest relative difference."""
    (ref0, _), _ = pairs[0]
    changed = []
    for k, (name, _) in enumerate(ref0.modules):
        both = [(ref.modules[k][1][i], run.modules[k][1][b]) for (ref, i), (run, b) in pairs
                if k < len(ref.modules) and k < len(run.modules) and ref.modules[k][0] == run.modules[k][0] == name]
        scale = _scale(r for r, _ in both)
        worst = max((rel(v, r, scale) for r, v in both), default=0.0)
        if worst > rtol and name != "output":
            changed.append((name, worst))
    return changed


def _check_inputs(x: object, lengths: object, axis: int) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise TypeError(f"x must be a tensor (B, ...) padded along axis {axis}, got "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.is_floating_point() \
            or lengths.dtype == torch.bool:
        raise TypeError("lengths must be an integer tensor (B,)")
    if not 0 < axis < x.dim():
        raise ValueError(f"time_axis={axis} is not an axis after the batch of x of shape {tuple(x.shape)}")
    if lengths.shape[0] != x.shape[0] or int(lengths.min()) < 1 or int(lengths.max()) > x.shape[axis]:
        raise ValueError(f"lengths of shape {tuple(lengths.shape)} (min {int(lengths.min())}, max "
                         f"{int(lengths.max())}) must give 1..{x.shape[axis]} for each of the {x.shape[0]} rows "
                         f"of x of shape {tuple(x.shape)}, padded along time_axis={axis} (pass time_axis= where "
                         f"x's time axis is)")
    return x, lengths


SCENARIOS = ("batched", "longer", "further", "garbage")


def _reference(runner: _Runner, x: torch.Tensor, lengths: torch.Tensor, keys: Sequence[int]) -> Run:
    """runner.run, with a ValueError (a norm that cannot find its mask) saying how the check pads x."""
    try:
        return runner.run(x, lengths, keys)
    except ValueError as err:
        raise ValueError(f"{err} [the check pads x of shape {tuple(x.shape)} along time_axis={runner.axis}: if "
                         f"that is not its time axis, pass time_axis=]") from err


def check_padding_invariance(
    model: nn.Module, x: torch.Tensor, lengths: torch.Tensor, *, forward: Forward = default_forward,
    output: Callable[[Any], torch.Tensor] = first_tensor, time_axis: int = 1, output_axis: Optional[int] = None,
    modes: Sequence[str] = ("train", "eval"), scenarios: Sequence[str] = SCENARIOS,
    extra: Optional[int] = None, garbage: float = 1e3, rtol: Optional[float] = None,
    dtype: torch.dtype = torch.float64, seed: int = 0, name: Optional[str] = None,
) -> InvarianceReport:
    """Run a copy of `model` (in `dtype`) on x (B, ..., T, ...) padded along `time_axis` beyond `lengths`,
    in the scenarios of the module docstring (a subset of SCENARIOS); forward(model, x, mask) calls it
    ((B, T) bool mask, True = valid), output(result) picks the tensor to compare, whose time axis is
    output_axis (default time_axis)."""
    x, lengths = _check_inputs(x, lengths, time_axis)
    if any(m not in ("train", "eval") for m in modes):
        raise ValueError(f"modes must be a subset of ('train', 'eval'), got {tuple(modes)}")
    if not scenarios or any(sc not in SCENARIOS for sc in scenarios):
        raise ValueError(f"scenarios must be a non-empty subset of {SCENARIOS}, got {tuple(scenarios)}")
    model = copy.deepcopy(model).to(dtype)
    x, lengths = x.to(dtype), lengths.to(x.device)
    rtol = 1e4 * torch.finfo(dtype).eps if rtol is None else rtol
    B, T = x.shape[0], x.shape[time_axis]
    extra = max(8, T // 2) if extra is None else extra
    shape = [1] * x.dim()
    shape[0], shape[time_axis] = B, T
    valid = prefix_mask(lengths, T).reshape(shape)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.where(valid, x, 0)
    noise = (garbage * torch.randn(x.shape, generator=gen, dtype=dtype)).to(x.device)
    junk = torch.where(valid, x, noise)
    pad = list(x.shape)
    pad[time_axis] = extra
    further = torch.cat([x0, x0.new_zeros(pad)], time_axis)
    longer_row = torch.randn(further[:1].shape, generator=gen, dtype=dtype).to(x.device) * x0.std()
    longer = torch.cat([further, longer_row], 0)
    runner = _Runner(model, forward, output, time_axis, time_axis if output_axis is None else output_axis, seed)
    report = InvarianceReport(name or type(model).__name__, rtol)
    keys = list(range(B))
    for mode in modes:
        model.train(mode == "train")
        if mode == "train":
            ref = _reference(runner, x0, lengths, keys)
            refs = [(ref, b) for b in keys]
            ref_grads = ref.grads
            runs = [("further", f"padded further (+{extra})", further, lengths, keys),
                    ("garbage", "garbage in the padding", junk, lengths, keys)]
        else:
            alone = [_reference(runner, x0[b:b + 1].narrow(time_axis, 0, int(lengths[b])), lengths[b:b + 1], [b])
                     for b in keys]
            refs = [(run, 0) for run in alone]
            ref_grads = {n: sum(run.grads[n] for run in alone) for n in alone[0].grads}
            longer_lengths = torch.cat([lengths, lengths.new_tensor([T + extra])])
            runs = [("batched", "batched, zero padding (vs alone)", x0, lengths, keys),
                    ("longer", f"with a longer sequence, +{extra} (vs alone)", longer, longer_lengths, keys + [None]),
                    ("garbage", "garbage in the padding (vs alone)", junk, lengths, keys)]
        for kind, scenario, xs, ls, ks in runs:
            if kind not in scenarios:
                continue
            try:
                run = runner.run(xs, ls, ks)
            except Exception as err:  # noqa: BLE001 - a scenario the model cannot take is reported, not fatal
                report.differences.append(Difference(scenario, mode, 0.0, 0.0, skipped=f"{type(err).__name__}: {err}"))
                continue
            pairs = [(refs[b], (run, b)) for b in range(B)]
            report.differences.append(_compare(pairs, ref_grads, run.grads, scenario, mode, rtol, runner.order))
    return report
