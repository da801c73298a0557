"""The README and the documentation pages as a newcomer meets them: every Python block runs as written,
every page the site lists exists, no page cites a repository path that is not there, and no page
speaks of the project's history.

A block that cannot run on its own (a fragment of the reader's model, several processes) is preceded
by the line `<!-- not-run: REASON -->`, REASON saying why; it is reported as skipped with that reason.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!-- not-run: (?P<reason>.*\S) -->$")
# A path in backticks that names a file or folder of the repository (globs allowed).
REPO_PATH = re.compile(r"`((?:impl|spec|reference|proofs|cli|tests|examples|docs|\.ci)/[\w./*-]*)`")
HISTORY = re.compile(r"\b[Ii]ssue \d+|\b[Tt]his stage\b|\bDESIGN\.md\b|\bFINDINGS\b|\bshared/")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    code: str
    not_run: str  # the reason, or "" for a block that runs

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks(page: Path) -> List[Block]:
    """The ```python blocks of a markdown page, each with the not-run reason on the line before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            marker = NOT_RUN.match(lines[i - 1].strip()) if i else None
            blocks.append(Block(page, i + 1, "\n".join(lines[i + 1:end]) + "\n", marker["reason"] if marker else ""))
            i = end
        i += 1
    return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page)]


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_python_block_runs_as_written(block, tmp_path, monkeypatch):
    if block.not_run:
        pytest.skip(f"not run: {block.not_run}")
    monkeypatch.chdir(tmp_path)  # the installed package, not the checkout's folders; files written go here
    exec(compile(block.code, str(block), "exec"), {"__name__": "__doc_block__"})


def test_blocks_are_found_and_markers_sit_on_blocks():
    readme = [b for b in BLOCKS if b.page.name == "README.md"]
    assert readme and not any(b.not_run for b in readme), "the README's blocks all run"
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines[:-1]):
            if NOT_RUN.match(line.strip()) or line.strip().startswith("<!-- not-run"):
                assert NOT_RUN.match(line.strip()), f"{page.name}:{n + 1}: a not-run marker needs a reason"
                assert lines[n + 1].strip() == "```python", f"{page.name}:{n + 1}: a not-run marker not before a block"


def test_the_site_lists_every_page_and_only_existing_ones():
    nav = re.findall(r"^\s+- [^:]+: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.MULTILINE)
    assert sorted(nav) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_cite_existing_paths_and_no_history(page):
    text = page.read_text(encoding="utf-8")
    missing = [path for path in REPO_PATH.findall(text) if not glob.glob(str(ROOT / path.rstrip("/")))]
    assert not missing, f"{page.name} cites paths that are not in the repository: {missing}"
    assert not HISTORY.findall(text), f"{page.name} speaks of the project's history: {HISTORY.findall(text)}"
