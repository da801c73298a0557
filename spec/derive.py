"""`masknorm derive`: run the derivation and regenerate spec/closed_forms.py, spec/weight_norm_forms.py and
spec/DERIVATION.md (`--check`: regenerate in memory, exit 1 naming each file that differs; `--out DIR`:
elsewhere)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

from masknorm.spec import derivation, expansion, render, weight_norm

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


def checkout_spec_dir() -> Optional[Path]:
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


def read_generated(path: Path) -> Optional[str]:
    return path.read_text(encoding="utf-8") if path.is_file() else None
