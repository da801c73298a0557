"""The record that lets `masknorm verify` skip re-deriving: spec/FINGERPRINT.json, written by `masknorm derive`.

It holds sha256 over the spec's sources (every spec/*.py but the generated closed_forms.py: names and
bytes), the sympy version, and sha256 of each generated file as that derivation wrote it. When all
three still hold, the generated files are what a re-derivation would write (the derivation is
deterministic given its sources and sympy), so verify checks them in milliseconds; when any differs,
verify re-derives (`derive --check`). CI always re-derives. Imports neither sympy nor torch.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
from pathlib import Path
from typing import Dict, List, Optional

SPEC_DIR = Path(__file__).resolve().parent
RECORD = "FINGERPRINT.json"
GENERATED = ("DERIVATION.md", "closed_forms.py")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sources() -> str:
    """sha256 over the derivation's sources (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(SPEC_DIR.glob("*.py")):
        if path.name not in GENERATED:
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def current(generated: Dict[str, str]) -> dict:
    """The record for generated files (name -> text) derived from the present sources and sympy."""
    return {"sources": sources(), "sympy": version("sympy"),
            "generated": {name: _sha(text.encode("utf-8")) for name, text in sorted(generated.items())}}


def write(folder: Path, generated: Dict[str, str]) -> Path:
    path = folder / RECORD
    path.write_text(json.dumps(current(generated), indent=2) + "\n", encoding="utf-8")
    return path


def recorded(folder: Path = SPEC_DIR) -> Optional[dict]:
    """The record in `folder`, None when there is none or it cannot be read."""
    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def stale(folder: Path = SPEC_DIR) -> List[str]:
    """Why the generated files in `folder` cannot be trusted without re-deriving ([] when they can)."""
    record = recorded(folder)
    if record is None:
        return [f"no readable {RECORD}"]
    reasons = []
    if record.get("sources") != sources():
        reasons.append("the spec's sources changed since the record")
    if record.get("sympy") != version("sympy"):
        reasons.append(f"sympy is {version('sympy')}, the record was derived with {record.get('sympy')}")
    for name in GENERATED:
        path = folder / name
        if not path.is_file() or _sha(path.read_bytes()) != record.get("generated", {}).get(name):
            reasons.append(f"{name} differs from the recorded derivation")
    return reasons
