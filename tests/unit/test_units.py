"""The systemd units say what tapd needs (read as text: no systemd, no root)."""

from __future__ import annotations

from pathlib import Path

UNITS = Path(__file__).resolve().parents[2] / "systemd"


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
