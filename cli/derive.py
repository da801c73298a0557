"""`masknorm derive`: run the derivation (masknorm.spec.derive) and write, or --check, the generated
spec files."""

from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

from masknorm._heartbeat import while_quiet
from masknorm.spec import fingerprint, render
from masknorm.spec import derive as derivation
from masknorm_cli import parsers


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of `masknorm derive`; 0 on success, 1 when --check finds a file that differs."""
    args = parsers.derive().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.out is None:
        args.out = derivation.SPEC_DIR if args.check else derivation.checkout_spec_dir()
    if args.out is None:
        print(f"masknorm derive: masknorm is installed as a package ({derivation.SPEC_DIR}); it writes into a checkout only. "
              "Pass --out DIR to write the generated files there, or --check to compare.", file=sys.stderr)
        return 2
    start = time.perf_counter()
    print("masknorm derive:")
    with while_quiet("  masknorm derive"):  # some steps are indivisible: a line at least every 10 s
        results = derivation.derive()
    forms = len(results.forms) + len(results.weight_norm_forms)
    identities = sum(e.identities for e in results.expansions + results.weight_norm_expansions)
    print(f"  {forms} closed forms, {len(results.generic_checks)} generic checks, {identities} expanded identities "
          f"in {time.perf_counter() - start:.2f} s")
    generated = render.files(results)
    if args.check:
        differing = [name for name, text in sorted(generated.items()) if derivation.read_generated(args.out / name) != text]
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
