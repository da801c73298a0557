"""The oracle's bias test (masknorm.reference.oracle.bias) on the conformance table's peers: how
often it flags a conforming peer (false alarms) and what it finds in biased ones (detection).

    python examples/systematic_error.py [--examples N] [--seeds None,1,2] [--output FILE]

False alarms: every peer of examples/conformance.py that conforms there, in float32 and float64,
over the seeds (None: the derandomized examples every `masknorm check` run draws); a run where
another property fails (Keras computes in float32 whatever the dtype), or that cannot call the peer
(einorm's float32 parameters refuse float64), is listed, not counted. Detection:
Keras BatchNormalization(mask=) in float32 (mean and variance over count + 1e-7), its arithmetic
written in torch, and a planted torch layer norm whose bias passes every worst-case property, over
the same seeds. Markdown to stdout, or to FILE.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conformance.py, beside this file
from conformance import EPS, PEERS, parser, version  # noqa: E402

CONFORMING = (
    "torch F.layer_norm", "torch F.rms_norm", "torch F.group_norm", "torch F.batch_norm", "torch F.instance_norm",
    "Keras LayerNormalization", "Keras RMSNormalization", "einorm Einorm('a b c', 'c')", "masknorm.masked_norm",
)


def keras_arithmetic(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keras BatchNormalization(mask=)'s arithmetic in torch: x (N, L, C), mask (N, L); the mean and
    variance over (N, L) divide by (count + 1e-7) in x's dtype (in float32 1 + 2^-23 at count 1, and
    count itself above)."""
    m = mask[..., None].expand(x.shape)
    k = m.sum((0, 1), keepdim=True).to(x.dtype)
    mu = torch.where(m, x, 0).sum((0, 1), keepdim=True) / (k + 1e-7)
    var = torch.where(m, (x - mu) ** 2, 0).sum((0, 1), keepdim=True) / (k + 1e-7)
    return (x - mu) / torch.sqrt(var + EPS)


def variance_over_count_plus(delta: float) -> Callable[..., Any]:
    """Layer norm whose variance (only) divides by (k + delta): the output is delta/(2k) too large,
    a few u in float32 for delta = 2e-6, within the worst-case bound, and constant groups are right."""

    def fn(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        k = mask.expand(x.shape).sum(-1, keepdim=True).to(x.dtype)
        mu = torch.where(mask, x, 0).sum(-1, keepdim=True) / k
        var = torch.where(mask, (x - mu) ** 2, 0).sum(-1, keepdim=True) / (k + delta)
        return torch.where(k > 0, (x - mu) / torch.sqrt(var + EPS), x)

    return fn


def run(name: str, make: Callable[[], Callable[..., Any]], semantics: dict, options: dict, examples: int,
        seed: Optional[int]) -> dict:
    """One check (gradients off: the bias test measures the forward draws); its systematic-error row."""
    from masknorm.testing import CallError, Semantics, check

    start = time.process_time()
    try:
        report = check(make(), Semantics(**semantics), examples=examples, seed=seed, name=name, **dict(options, grad=False))
    except CallError as err:  # einorm's float32 parameters refuse float64 input
        return dict(name=name, dtype=options.get("dtype", "float64"), seed=seed, status="cannot check", detail=str(err),
                    forward="-", worst=float("nan"), others=["cannot be called"], cpu=time.process_time() - start)
    result = next(p for p in report.properties if p.name == "systematic error")
    forward = next(p for p in report.properties if p.name == "forward vs reference")
    return dict(name=name, dtype=options.get("dtype", "float64"), seed=seed, status=result.status,
                detail=result.detail if result.status == "pass" else result.reason, forward=forward.status, worst=forward.worst,
                others=[p.name for p in report.failed if p.name != "systematic error"], cpu=time.process_time() - start)


def main(argv: Optional[List[str]] = None) -> int:
    p = parser(__doc__, "the false-alarm and detection tables")
    p.add_argument("--seeds", default="None,1,2", help="comma-separated seeds; None: derandomized (default None,1,2)")
    args = p.parse_args(argv)
    seeds = [None if s == "None" else int(s) for s in args.seeds.split(",")]
    rows = []
    for peer in PEERS:
        if peer.name not in CONFORMING or version(peer.package) is None:
            continue
        for dtype in ("float32", "float64"):
            for seed in seeds:
                rows.append(run(peer.name, peer.make, peer.semantics, dict(peer.options, dtype=dtype), args.examples, seed))
                print(f"{peer.name} {dtype} seed={seed}: {rows[-1]['status']} {rows[-1]['detail']}", file=sys.stderr, flush=True)
    counted = [r for r in rows if not r["others"]]
    alarms = [r for r in counted if r["status"] == "fail"]
    keras = next(peer for peer in PEERS if peer.name == "Keras BatchNormalization(mask=)")
    found = []
    biased = [("planted: Keras's arithmetic in torch", lambda: keras_arithmetic, keras.semantics, keras.options),
              ("planted: layer norm, variance over k + 2e-6", lambda: variance_over_count_plus(2e-6),
               dict(dim=-1, eps=EPS), dict(dtype="float32"))]
    if version("keras") is not None:
        biased.insert(0, (keras.name, keras.make, keras.semantics, keras.options))
    for name, make, semantics, options in biased:
        for seed in seeds:
            found.append(run(name, make, semantics, options, args.examples, seed))
            print(f"{name} seed={seed}: {found[-1]['status']} {found[-1]['detail']}", file=sys.stderr, flush=True)
    lines = [
        f"False alarms: {len(alarms)} of {len(counted)} conforming checks ({len(set(r['name'] for r in rows))} "
        f"peers x float32/float64 x seeds {args.seeds}, {args.examples} examples; torch {torch.__version__}; "
        f"{len(rows) - len(counted)} runs failing another property or the call not counted).", "",
        "| peer | dtype | seed | systematic error | estimates | other failures | CPU s |", "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['name']} | {r['dtype']} | {r['seed']} | {r['status']} | {r['detail']} | "
              f"{', '.join(r['others']) or 'none'} | {r['cpu']:.1f} |" for r in rows]
    lines += ["", f"Detection (float32, seeds {args.seeds}):", ""]
    for name in dict.fromkeys(r["name"] for r in found):
        mine = [r for r in found if r["name"] == name]
        bound = [r for r in mine if r["forward"] == "fail"]
        flagged = [r for r in mine if r["status"] == "fail"]
        lines.append(f"- {name}: forward vs reference fails in {len(bound)} of {len(mine)} runs; the bias test flags "
                     f"{len(flagged)} of the other {len(mine) - len(bound)}; any property fails in "
                     f"{sum(bool(r['others']) or r['status'] == 'fail' for r in mine)} of {len(mine)}.")
    lines += ["", "| peer | seed | systematic error | estimates | forward vs reference (worst u·κ) | other failures |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['seed']} | {r['status']} | {r['detail']} | {r['forward']} ({r['worst']:.3g}) | "
              f"{', '.join(r['others']) or 'none'} |" for r in found]
    text = "\n".join(lines) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
