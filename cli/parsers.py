"""The subcommands' argument parsers, importable without torch (so that every `--help` is instant).

Each command's module builds its parser here and parses with it: one definition of each option.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Tuple, Union

# One line per command: its help in `masknorm --help` and its parser's description.
SUMMARIES = {
    "verify": "the main job: the generated spec is current, then the torch layers vs the reference",
    "derive": "regenerate the symbolic derivations (--check: re-derive and fail on drift)",
    "prove": "confirm the theorems symbolically (table, or --json)",
    "check": "check your own normalization against the reference (exit 0/1/2)",
    "bench": "time masked_norm against torch's native kernels (ratios, spread, memory)",
    "build": "build the fused CPU kernel now (once per machine; for container images)",
}
BENCH_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32)}
CHECK_DTYPES = ("float64", "float32", "bfloat16", "float16")


def _new(name: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"masknorm {name}", description=SUMMARIES[name])


def verify() -> argparse.ArgumentParser:
    p = _new("verify")
    p.add_argument("--thorough", action="store_true", help="five seeds per case instead of one")
    p.add_argument("--skip-derive", action="store_true", help="do not check the generated spec files first")
    p.add_argument("--rederive", action="store_true",
                   help="always re-derive with sympy (`derive --check`, minutes), even when the fingerprint matches")
    return p


def derive() -> argparse.ArgumentParser:
    p = _new("derive")
    p.add_argument("--check", action="store_true", help="regenerate in memory; exit 1 if a file differs")
    p.add_argument("--out", type=Path, default=None,
                   help="directory of the generated files (default: spec/ of an editable checkout; required "
                        "without --check when masknorm is installed from a wheel)")
    return p


def prove() -> argparse.ArgumentParser:
    p = _new("prove")
    p.add_argument("names", nargs="*", metavar="THEOREM", help="prove only these (default: all, as the table lists)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    return p


def axes(text: str) -> Union[int, Tuple[int, ...]]:
    """"-1" -> -1, "0,2" -> (0, 2)."""
    try:
        parsed = tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from err
    return parsed[0] if len(parsed) == 1 else parsed


def check() -> argparse.ArgumentParser:
    p = _new("check")
    p.add_argument("target", metavar="MODULE:CALLABLE", help="the normalization to check, e.g. mypkg.norms:layer_norm")
    p.add_argument("--ndim", type=int, help="rank of x (default: any rank that fits --dim, up to 3)")
    p.add_argument("--dim", type=axes, default=-1, help="reduced axes, e.g. -1 or 0,2 (default -1)")
    masks = p.add_mutually_exclusive_group()
    masks.add_argument("--mask-dims", type=axes, help="axes the mask varies along; size 1 elsewhere (default: all)")
    masks.add_argument("--no-mask", action="store_true", help="call fn(x): a plain (unmasked) normalization")
    p.add_argument("--correction", type=int, default=0, help="variance divisor k - C (default 0: biased)")
    p.add_argument("--eps", type=float, default=1e-5, help="added to the variance (default 1e-5)")
    p.add_argument("--rms", action="store_true", help="no mean subtraction (RMS norm)")
    p.add_argument("--masked", choices=("normalize", "keep", "zero"), default="normalize",
                   help="output at masked-out positions")
    p.add_argument("--grad", action="store_true", help="also check torch autograd gradients")
    p.add_argument("--dtype", choices=CHECK_DTYPES, default="float64")
    p.add_argument("--examples", type=int, default=100, help="hypothesis examples per property (default 100)")
    p.add_argument("--seed", type=int, help="hypothesis seed (default: derandomized, the same examples every run)")
    p.add_argument("--extreme", action="store_true", help="draw values at the dtype's overflow/underflow thresholds")
    p.add_argument("--min-group-size", type=int, default=1, help="smallest group fn accepts (default 1)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    return p


def bench() -> argparse.ArgumentParser:
    p = _new("bench")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per implementation (default 15)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--scale", type=float, default=1.0, help="shrink the sequence axes for a quick look")
    setting = " ".join(f"{name}={value}" for name, value in BENCH_ALLOCATOR.items())
    p.add_argument("--allocator", choices=["tuned", "default"], default="tuned",
                   help=f"tuned: rerun with {setting} (default); default: as is")
    return p


def build() -> argparse.ArgumentParser:
    p = _new("build")
    p.add_argument("--where", action="store_true", help="print where the build is (or will be) kept and exit")
    return p
