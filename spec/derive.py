"""`masknorm derive`: run the derivation and regenerate spec/closed_forms.py, spec/weight_norm_forms.py and
spec/DERIVATION.md (`--check`: regenerate in memory, exit 1 naming each file that differs; `--out DIR`:
elsewhere)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

from masknorm.spec import derivation, expansion, render, weight_norm

SPEC_DIR = Path(__file__).resolve().parent
T = TypeVar("T")


def _timed(label: str, step: Callable[[], T]) -> T:
    start = time.perf_counter()
    value = step()
    print(f"  {label:<58} {time.perf_counter() - start:6.2f} s", flush=True)
    return value


def derive() -> render.Results:
    """Derive and confirm everything, printing each step with its time."""
    forms = _timed("generic closed forms (derived, forward-checked, = DESIGN.md)", derivation.closed_forms)
    checks = _timed("generic policy and degenerate checks", derivation.generic_checks)
    expansions = []
    for size in expansion.SIZES:
        step = _timed(f"expansion n = {size}", lambda size=size: expansion.expand_size(size))
        print(f"    {len(step.masks)} masks, {step.identities} identities", flush=True)
        expansions.append(step)
    weight_norm_forms = _timed("WeightNorm closed forms (derived, forward-checked)", weight_norm.closed_forms)
    sizes = weight_norm.EXPANDED_SIZES
    weight_norm_expansions = _timed(f"WeightNorm expansion n = {sizes[0]}..{sizes[-1]}",
                                    lambda: tuple(weight_norm.expand_size(size) for size in sizes))
    return render.Results(forms, checks, tuple(expansions), weight_norm_forms, weight_norm_expansions)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of `masknorm derive`; 0 on success, 1 when --check finds a file that differs."""
    parser = argparse.ArgumentParser(prog="masknorm derive", description=__doc__)
    parser.add_argument("--check", action="store_true", help="regenerate in memory; exit 1 if a file differs")
    parser.add_argument("--out", type=Path, default=SPEC_DIR, help="directory of the generated files (default: spec/)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
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
        return 1 if differing else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(generated.items()):
        (args.out / name).write_text(text, encoding="utf-8")
        print(f"  wrote {args.out / name}")
    return 0


def _read(path: Path) -> Optional[str]:
    return path.read_text(encoding="utf-8") if path.is_file() else None
