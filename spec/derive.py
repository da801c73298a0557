"""`masknorm derive`: run the derivation and regenerate spec/closed_forms.py, spec/weight_norm_forms.py and
spec/DERIVATION.md (`--check`: regenerate in memory, exit 1 naming each file that differs; `--out DIR`:
elsewhere)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

from masknorm.spec import derivation, expansion, fingerprint, render, weight_norm
from masknorm_cli import parsers

SPEC_DIR = Path(__file__).resolve().parent
T = TypeVar("T")
PROGRESS_S = 3.0  # at most this long between progress lines


def _progress(size: int) -> Callable[[int, int], None]:
    """progress(done, total) for expansion n = size: a line when PROGRESS_S have passed since the last."""
    start = last = time.perf_counter()

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= PROGRESS_S and done < total:
            print(f"    n = {size}: {done}/{total} steps, {now - start:.0f} s", flush=True)
            last = now

    return report


def _checkout_spec_dir() -> Optional[Path]:
    """spec/ when masknorm runs from a checkout (pyproject.toml beside it), None from a wheel install."""
    return SPEC_DIR if (SPEC_DIR.parent / "pyproject.toml").is_file() else None


def _timed(label: str, step: Callable[[], T]) -> T:
    start = time.perf_counter()
    value = step()
    print(f"  {label:<58} {time.perf_counter() - start:6.2f} s", flush=True)
    return value


def derive() -> render.Results:
    """Derive and confirm everything, printing each step with its time."""
    forms = _timed("generic closed forms (derived, forward-checked, = CONTRACT.md)", derivation.closed_forms)
    checks = _timed("generic policy and degenerate checks", derivation.generic_checks)
    expansions = []
    for size in expansion.SIZES:
        step = _timed(f"expansion n = {size}", lambda size=size: expansion.expand_size(size, _progress(size)))
        print(f"    {len(step.masks)} masks, {step.identities} identities", flush=True)
        expansions.append(step)
    weight_norm_forms = _timed("WeightNorm closed forms (derived, forward-checked)", weight_norm.closed_forms)
    sizes = weight_norm.EXPANDED_SIZES
    weight_norm_expansions = _timed(f"WeightNorm expansion n = {sizes[0]}..{sizes[-1]}",
                                    lambda: tuple(weight_norm.expand_size(size) for size in sizes))
    return render.Results(forms, checks, tuple(expansions), weight_norm_forms, weight_norm_expansions)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of `masknorm derive`; 0 on success, 1 when --check finds a file that differs."""
    args = parsers.derive().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.out is None:
        args.out = SPEC_DIR if args.check else _checkout_spec_dir()
    if args.out is None:
        print(f"masknorm derive: masknorm is installed as a package ({SPEC_DIR}); it writes into a checkout only. "
              "Pass --out DIR to write the generated files there, or --check to compare.", file=sys.stderr)
        return 2
    start = time.perf_counter()
    print("masknorm derive:")
    results = derive()
    forms = len(results.forms) + len(results.weight_norm_forms)
    identities = sum(e.identities for e in results.expansions + results.weight_norm_expansions)
    print(f"  {forms} closed forms, {len(results.generic_checks)} generic checks, {identities} expanded identities "
          f"in {time.perf_counter() - start:.2f} s")
    generated = render.files(results)
    if args.check:
        differing = [name for name, text in sorted(generated.items()) if _read(args.out / name) != text]
        for name in differing:
            print(f"masknorm derive --check: {args.out / name} differs from the derivation "
                  "(run `masknorm derive`)", file=sys.stderr)
        if not differing:
            print(f"  up to date: {', '.join(sorted(generated))}")
            if fingerprint.current(generated) != fingerprint.recorded(args.out):
                print(f"  (the fingerprint in {args.out / fingerprint.RECORD} is not current: `masknorm derive` "
                      "records it, so that `masknorm verify` can skip re-deriving)")
        return 1 if differing else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(generated.items()):
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"  wrote {args.out / name}")
    print(f"  wrote {fingerprint.write(args.out, generated)}")
    return 0


def _read(path: Path) -> Optional[str]:
    return path.read_text(encoding="utf-8") if path.is_file() else None
