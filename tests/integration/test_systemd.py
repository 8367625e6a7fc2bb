"""The systemd units pass ``systemd-analyze verify`` (tests/unit/test_units.py
reads what they say)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze comes with systemd, installed by .ci/setup"
    # verify insists that ExecStart= exists: point it at this tapd.
    tapd = Path(sys.executable).parent / "tapd"
    assert tapd.exists(), "tapd is installed in the test environment"
    for unit in ("tapd.service", "tapd.socket"):
        text = (UNITS / unit).read_text().replace("/usr/local/bin/tapd", str(tapd))
        (tmp_path / unit).write_text(text)
    # verify runs man(1) for each Documentation= page: lay out the repository's
    # pages as the install does, so that a page the units name must exist.
    for page in (UNITS / "man").iterdir():
        section = tmp_path / "man" / f"man{page.suffix[1:]}"
        section.mkdir(parents=True, exist_ok=True)
        (section / page.name).write_bytes(page.read_bytes())
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "tapd.socket"), str(tmp_path / "tapd.service")],
        capture_output=True,
        text=True,
        env={**os.environ, "MANPATH": str(tmp_path / "man")},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
