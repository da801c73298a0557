"""`masknorm bench`'s small-input cases: microseconds per call of a masknorm module beside torch's.

Streaming and small-batch inference, and models with dozens of norms per step, call a norm on a
few hundred values: there the cost is the per-call overhead (argument checks, dispatch, Python
hops), not the arithmetic. Each case times many calls of one module in a loop (CPU time or wall
clock, as `masknorm bench --clock` says), masknorm's and torch's interleaved, and reports the
median time per call, its spread and the ratio, against GOAL_SMALL (1.5x torch's time per call).

    eval no_grad:  out = module(x, mask) under torch.no_grad(), the module in eval mode
    fwd / fwd+bwd: training mode, x requiring grad; fwd+bwd also runs backward(dy)
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

from masknorm.modules import MaskedBatchNorm1d, MaskedGroupNorm, MaskedLayerNorm

GOAL_SMALL = 1.5  # masknorm within 1.5x of torch's time per call


@dataclass
class SmallCase:
    name: str
    ours: Callable[[], object]
    theirs: Callable[[], object]
    grad: bool  # run with autograd recording (else under torch.no_grad())


def _lengths(B: int, T: int, lengths: List[int]) -> torch.Tensor:
    return torch.arange(T).unsqueeze(0) < torch.tensor(lengths[:B]).unsqueeze(1)


def small_cases() -> List[SmallCase]:
    """The per-call cases: batch 1-2, eval no_grad and train fwd / fwd+bwd."""
    gen = torch.Generator().manual_seed(0)
    out = []
    x = torch.randn(1, 100, 256, generator=gen)
    mask = _lengths(1, 100, [80])
    ln, torch_ln = MaskedLayerNorm(256).eval(), torch.nn.LayerNorm(256).eval()
    out += [SmallCase("MaskedLayerNorm(256) eval no_grad, x (1, 100, 256), mask", lambda: ln(x, mask),
                      lambda: torch_ln(x), False),
            SmallCase("MaskedLayerNorm(256) eval no_grad, x (1, 100, 256), no mask", lambda: ln(x),
                      lambda: torch_ln(x), False)]
    xc = torch.randn(1, 256, 100, generator=gen)
    gn, torch_gn = MaskedGroupNorm(32, 256), torch.nn.GroupNorm(32, 256)
    bn, torch_bn = MaskedBatchNorm1d(256).eval(), torch.nn.BatchNorm1d(256).eval()
    out += [SmallCase("MaskedGroupNorm(32, 256) no_grad, x (1, 256, 100), mask", lambda: gn(xc, mask),
                      lambda: torch_gn(xc), False),
            SmallCase("MaskedBatchNorm1d(256) eval no_grad, x (1, 256, 100), mask", lambda: bn(xc, mask),
                      lambda: torch_bn(xc), False)]
    xs = torch.randn(2, 8, 16, generator=gen, requires_grad=True)
    dy = torch.randn(2, 8, 16, generator=gen)
    for label, ours, theirs, valid in (
        ("MaskedLayerNorm(16)", MaskedLayerNorm(16), torch.nn.LayerNorm(16), _lengths(2, 8, [8, 5])),
        ("MaskedBatchNorm1d(8)", MaskedBatchNorm1d(8), torch.nn.BatchNorm1d(8), _lengths(2, 16, [16, 10])),
    ):
        out += [SmallCase(f"{label} train fwd, x (2, 8, 16), mask", lambda m=ours, k=valid: m(xs, k),
                          lambda m=theirs: m(xs), True),
                SmallCase(f"{label} train fwd+bwd, x (2, 8, 16), mask", lambda m=ours, k=valid: m(xs, k).backward(dy),
                          lambda m=theirs: m(xs).backward(dy), True)]
    return out


def run_small(case: SmallCase, repeats: int, warmup: int, clock: Callable[[], float], calls: int = 200) -> Dict:
    """Median microseconds per call of each side over `repeats` interleaved loops of `calls` calls."""
    samples: Dict[str, List[float]] = {"masknorm": [], "torch": []}
    with torch.set_grad_enabled(case.grad):
        for i in range(warmup + repeats):
            for name, fn in (("masknorm", case.ours), ("torch", case.theirs)):
                start = clock()
                for _ in range(calls):
                    fn()
                if i >= warmup:
                    samples[name].append(1e6 * (clock() - start) / calls)
    return {name: (statistics.median(s), spread(s)) for name, s in samples.items()}


def spread(samples: List[float]) -> float:
    """Interquartile range over median (0 for one run)."""
    if len(samples) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(samples)


def print_small(case: SmallCase, result: Dict) -> None:
    ours, theirs = result["masknorm"][0], result["torch"][0]
    ratio = ours / theirs
    goal = f"  over the {GOAL_SMALL}x goal" if ratio > GOAL_SMALL else ""
    noisy = max(s for _, s in result.values())
    print(f"  {case.name:<62} {ours:>8.1f} {theirs:>8.1f} {ratio:>6.2f}x {100 * noisy:>6.0f}%{goal}")


def print_header() -> None:
    print(f"\nsmall inputs: microseconds per call (median of loops of 200 calls); spread: the larger side's "
          "interquartile range / median")
    print(f"  {'case':<62} {'masknorm':>8} {'torch':>8} {'ratio':>7} {'spread':>7}")
