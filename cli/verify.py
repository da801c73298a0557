"""`masknorm verify`: the spec is current (`masknorm derive --check`, or the recorded fingerprint),
then every case of masknorm.reference.verify against the mpmath reference, in a table of u*kappa errors."""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

from masknorm.fast.native import describe
from masknorm.reference import verify_weight_norm
from masknorm.reference.verify import FORWARD_BOUND, GRADIENT_BOUND, Row, run, worst_per_dtype
from masknorm_cli import parsers


def _progress(line: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{line}")
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _spec_is_current(rederive: bool) -> bool:
    """The generated spec files are what the derivation writes: by the recorded fingerprint when it
    still holds (milliseconds), else (or with --rederive) by re-deriving with sympy (`derive --check`)."""
    from masknorm.spec import fingerprint

    reasons = ["--rederive"] if rederive else fingerprint.stale()
    if not reasons:
        record = fingerprint.recorded()
        print(f"spec: {', '.join(fingerprint.GENERATED)} match the recorded derivation (sources "
              f"{record['sources'][:12]}, sympy {record['sympy']}); not re-derived (`--rederive` forces it)",
              flush=True)
        return True
    from masknorm_cli.derive import main as derive_main

    print(f"spec: re-deriving ({'; '.join(reasons)}): masknorm derive --check", flush=True)
    if derive_main(["--check"]) != 0:
        print("FAIL: the committed derivations differ from the spec", flush=True)
        return False
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parsers.verify().parse_args(argv)
    start = time.perf_counter()
    if not args.skip_derive and not _spec_is_current(args.rederive):
        return 1
    if args.backend == "triton":
        if os.environ.setdefault("TRITON_INTERPRET", "1") == "1":
            print("backend triton: the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1)",
                  flush=True)
        families = run(args.thorough, _progress, "triton")
        skipped = Row("weight_norm", float("nan"), float("nan"), skipped="not a normalization the kernels run")
        rows = families + [skipped]
    else:
        print(f"torch implementation: {describe()}", flush=True)
        families = run(args.thorough, _progress, args.backend)
        rows = families + [Row(*case) for case in verify_weight_norm.run(args.thorough, _progress)]
    _progress("")
    print(f"\n{'family / policy / dtype / seed':<37} {'forward u*kappa':>16} {'gradient u*kappa':>17}  result")
    for row in rows:
        figures = f"{'-':>16} {'-':>17}" if row.skipped else f"{row.forward:>16.3g} {row.gradient:>17.3g}"
        print(f"{row.case:<37} {figures}  {row.result}")
    print("\nworst per dtype (families):\n" + "\n".join(worst_per_dtype(families)))
    failed = sum(not r.passed for r in rows)
    skipped = sum(bool(r.skipped) for r in rows)
    print(f"\n{len(rows) - failed - skipped} passed, {failed} failed, {skipped} skipped (bounds: forward "
          f"{FORWARD_BOUND}, gradient {GRADIENT_BOUND} u*kappa) in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
