"""The README's Layout table names every module of tapd, and only those."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _layout_modules() -> set[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(tapd/\w+\.py)`", section))


def test_the_layout_table_matches_the_tree() -> None:
    tree = {f"tapd/{p.name}" for p in (REPO / "tapd").glob("*.py") if p.name != "__init__.py"}
    listed = _layout_modules()
    assert not tree - listed, f"modules the README's Layout does not name: {sorted(tree - listed)}"
    assert not listed - tree, f"the Layout names modules that are gone: {sorted(listed - tree)}"
