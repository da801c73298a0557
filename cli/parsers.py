"""The subcommands' argument parsers, importable without torch (so that every `--help` is instant).

Each command's module builds its parser here and parses with it: one definition of each option.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

# One line per command: its help in `masknorm --help` and its parser's description.
SUMMARIES = {
    "verify": "the main job: the generated spec is current, then the torch layers vs the reference",
    "derive": "regenerate the symbolic derivations (--check: re-derive and fail on drift)",
    "prove": "confirm the theorems symbolically (table, or --json)",
    "check": "check your own normalization against the reference (exit 0/1/2)",
    "bench": "time masked_norm against torch's native kernels (ratios, spread, memory)",
    "build": "build the fused CPU kernel now (once per machine; for container images)",
    "invariance": "is a whole model padding-invariant? (exit 0/1/2)",
}
BENCH_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32)}
CHECK_DTYPES = ("float64", "float32", "bfloat16", "float16")
# Torch-free copies of the oracle's choices and defaults (masknorm.reference.oracle: semantics.DEGENERATE,
# run.EXAMPLES, run.SHRINKS, the frameworks of .frameworks), so that `masknorm check --help` imports
# no torch; tests/cli/test_cli_help.py checks that they equal the library's.
CHECK_FRAMEWORKS = ("torch", "numpy", "jax", "keras")
CHECK_DEGENERATE = ("passthrough", "zero", "nan", "unchecked")
CHECK_EXAMPLES = 100  # per property
CHECK_SHRINKS = 100  # successful shrinks per failing property (deterministic, unlike a time limit)
# Options whose value may start with "-" (negative axes): argparse would take "-2,-1" for an option.
AXES_OPTIONS = ("--dim", "--mask-dims")


def _new(name: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"masknorm {name}", description=SUMMARIES[name])


def verify() -> argparse.ArgumentParser:
    p = _new("verify")
    p.add_argument("--thorough", action="store_true", help="five seeds per case instead of one")
    p.add_argument("--skip-derive", action="store_true", help="do not check the generated spec files first")
    p.add_argument("--rederive", action="store_true",
                   help="always re-derive with sympy (`derive --check`, minutes), even when the fingerprint matches")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="masked_norm's backend; triton: the cases the Triton kernels take, on CPU tensors under "
                        "TRITON_INTERPRET=1, the others listed as skipped (default auto)")
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
    p.add_argument("names", nargs="*", metavar="THEOREM",
                   help="prove only these, by number as the documentation numbers them (1-17; 11e and 12e are "
                        "the explicit expansions of 11 and 12) or by name (default: 1-17)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    p.add_argument("--expanded", action="store_true",
                   help="also confirm theorems 11 and 12 by explicit expansion for small n (slow)")
    return p


def axes(text: str) -> Union[int, Tuple[int, ...]]:
    """"-1" -> -1, "0,2" -> (0, 2)."""
    try:
        parsed = tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from err
    return parsed[0] if len(parsed) == 1 else parsed


def sides(text: str) -> Tuple[Optional[Union[int, Tuple[int, int]]], ...]:
    """"*,2-4,3" -> (None, (2, 4), 3): per axis any side, a range, or one side."""
    out: list = []
    try:
        for part in text.split(","):
            low, sep, high = part.partition("-")
            out.append(None if part == "*" else (int(low), int(high)) if sep else int(part))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected per axis *, N or LOW-HIGH separated by commas, got {text!r}") from err
    return tuple(out)


def join_axes(argv: Sequence[str]) -> List[str]:
    """argv with "--dim -2,-1" written as "--dim=-2,-1", so that argparse reads the negative axes."""
    out: List[str] = []
    for arg in argv:
        if out and out[-1] in AXES_OPTIONS and arg.startswith("-") and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def check() -> argparse.ArgumentParser:
    p = _new("check")
    p.add_argument("target", metavar="MODULE:CALLABLE", help="the normalization to check, e.g. mypkg.norms:layer_norm")
    p.add_argument("--ndim", type=int, help="rank of x (default: any rank that fits --dim, up to 3)")
    p.add_argument("--dim", type=axes, default=-1, help="reduced axes, e.g. -1 or 0,2 (default -1)")
    masks = p.add_mutually_exclusive_group()
    masks.add_argument("--mask-dims", type=axes, help="axes the mask varies along; size 1 elsewhere (default: all)")
    masks.add_argument("--no-mask", action="store_true", help="call fn(x): a plain (unmasked) normalization")
    p.add_argument("--squeeze-mask", action="store_true", help="pass the mask with only the --mask-dims axes (Keras, masked_norm)")
    p.add_argument("--padding-mask", action="store_true", help="the mask is True at padding (torch's key_padding_mask)")
    p.add_argument("--segments", action="store_true",
                   help="call fn(x_nodes, batch) as graph libraries do: x[mask] and each node's graph (its index along "
                        "axis 0); needs --mask-dims over the leading axes, e.g. 0,1, and --masked keep")
    p.add_argument("--correction", type=int, default=0, help="variance divisor k - C (default 0: biased)")
    p.add_argument("--eps", type=float, default=1e-5, help="added to the variance (default 1e-5)")
    p.add_argument("--eps-outside", action="store_true", help="(x - mu)/(sigma + eps) instead of /sqrt(sigma^2 + eps)")
    p.add_argument("--rms", action="store_true", help="no mean subtraction (RMS norm)")
    p.add_argument("--masked", choices=("normalize", "keep", "zero"), default="normalize",
                   help="output at masked-out positions")
    p.add_argument("--degenerate", choices=CHECK_DEGENERATE, default="passthrough",
                   help="output of a group with no spread or no valid position (default passthrough: x)")
    p.add_argument("--grad", action="store_true", help="also check gradients, by fn's framework's autodiff")
    p.add_argument("--framework", choices=CHECK_FRAMEWORKS, help="fn's arrays (default: detected from what fn returns)")
    p.add_argument("--no-jit", action="store_true",
                   help="JAX: call fn and its VJP op by op (default: under jax.jit, compiled once per shape)")
    p.add_argument("--shapes", choices=("all", "buckets"),
                   help="draw any shape, or only 3 per rank (default: buckets for JAX, which compiles per shape; all otherwise)")
    p.add_argument("--dtype", choices=CHECK_DTYPES, default="float64")
    p.add_argument("--sides", type=sides, help="per axis: *, N or LOW-HIGH, e.g. '*,*,2-4' (default: 1 to 8/6/4/3 by rank)")
    p.add_argument("--examples", type=int, default=CHECK_EXAMPLES,
                   help=f"hypothesis examples per property (default {CHECK_EXAMPLES})")
    p.add_argument("--seed", type=int, help="hypothesis seed (default: derandomized, the same examples every run)")
    p.add_argument("--extreme", action="store_true", help="draw values at the dtype's overflow/underflow thresholds")
    p.add_argument("--min-group-size", type=int, default=1, help="smallest group fn accepts (default 1)")
    p.add_argument("--min-valid", type=int, default=0, metavar="N",
                   help="draw only masks leaving at least N valid positions in every group (default 0: empty groups too)")
    p.add_argument("--shrinks", type=int, default=CHECK_SHRINKS,
                   help=f"successful shrinks of each counterexample (default {CHECK_SHRINKS})")
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
    p.add_argument("--compiled", action="store_true",
                   help="also time torch.compile of each masknorm module against torch.compile of torch's")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: as is)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: the process's CPU time (with --threads 1: the work, without the time other "
                        "processes take the core on a loaded machine)")
    p.add_argument("--only", default="", help="run only the cases whose name contains this text")
    return p


def build() -> argparse.ArgumentParser:
    p = _new("build")
    p.add_argument("--where", action="store_true", help="print where the build is (or will be) kept and exit")
    return p


def invariance() -> argparse.ArgumentParser:
    p = _new("invariance")
    p.add_argument("target", help="MODULE:FUNCTION returning dict(model=..., x=..., lengths=..., [forward=...])")
    p.add_argument("--convert", action="store_true", help="masknorm.convert(model) before the check")
    p.add_argument("--modes", default="train,eval", help="comma-separated subset of train,eval (default both)")
    p.add_argument("--scenarios", default=None,
                   help="comma-separated subset of batched,longer,further,garbage (default all; a scenario the model "
                        "raises on is skipped with a note)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default 1e4 u of the dtype)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    return p
