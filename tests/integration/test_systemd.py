"""The systemd units are valid, and say what tapd needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"


@pytest.mark.root
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


def _directives(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_service_is_notify_and_confined_to_what_tapd_needs() -> None:
    service = _directives("tapd.service")
    assert service["Type"] == ["notify"]
    assert service["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK"]
    assert service["DevicePolicy"] == ["closed"]
    assert sorted(service["DeviceAllow"]) == ["/dev/net/tun rw", "/dev/vhost-net rw"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[key] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    socket = _directives("tapd.socket")
    assert socket["ListenStream"] == ["/run/tapd.sock"]
    assert socket["SocketMode"] == ["0660"]
