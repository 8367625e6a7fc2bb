"""The systemd units say what tapd needs (read as text: no systemd, no root)."""

from __future__ import annotations

from tapdtest import unit_directives


def test_service_is_notify_and_confined_to_what_tapd_needs() -> None:
    service = unit_directives("tapd.service")
    assert service["Type"] == ["notify"]
    assert service["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK"]
    assert service["DevicePolicy"] == ["closed"]
    assert sorted(service["DeviceAllow"]) == ["/dev/net/tun rw", "/dev/vhost-net rw"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[key] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    socket = unit_directives("tapd.socket")
    assert socket["ListenStream"] == ["/run/tapd.sock"]
    assert socket["SocketMode"] == ["0660"]
