"""The code checks its own types and lint as part of the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_mypy_strict_is_clean() -> None:
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    result = _run("ruff", "check", "tapd", "tests")
    assert result.returncode == 0, result.stdout + result.stderr
    result = _run("ruff", "format", "--check", "tapd", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_two_test_modules_share_a_name() -> None:
    # tests/ has no packages, so pytest imports each test file by its basename:
    # two of the same name in different directories break collection of the whole suite.
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(ROOT)} and {path.relative_to(ROOT)}")
        seen[path.name] = path
    assert not clashes, clashes
