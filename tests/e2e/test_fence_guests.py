"""Fenced ports with real guests: on a bridge whose rule has ``mac_filtering``
and ``port_isolation``, a guest whose NIC uses tapd's ``{mac}`` reaches the
bridge but not an isolated neighbour, and a guest that sends with another MAC
reaches nothing.  The same guests on an unfenced rule reach both (the
control), so a failure to ping in the fenced run is the fence's doing."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest import GuestImage, qemu_argv
from tapdtest import Daemon, ip, run_daemon
from test_matrix import Qemu, single_thread_tcg

pytestmark = pytest.mark.e2e

BRIDGE = "10.77.8.1"
A, B, C = "10.77.8.2", "10.77.8.3", "10.77.8.4"

RULE = """
[[allow]]
users = ["0"]
bridges = ["br0"]
{fence}
"""


@pytest.fixture(params=["fenced", "control"])
def tenant_bridge(
    request: pytest.FixtureRequest, ns: str, br0: str, tmp_path: Path
) -> Iterator[tuple[Daemon, bool]]:
    fenced = request.param == "fenced"
    fence = "mac_filtering = true\nport_isolation = true" if fenced else ""
    ip("-n", ns, "addr", "add", f"{BRIDGE}/24", "dev", "br0")
    with run_daemon(ns, tmp_path, RULE.format(fence=fence)) as daemon:
        yield daemon, fenced


def guest(daemon: Daemon, image: GuestImage, addr: str, ping: str, mac: str, extra: str) -> Qemu:
    argv = qemu_argv(
        image,
        "tap,id=n0,fd={fd}",
        ip=f"{addr}/24",
        ping=ping,
        device=f"virtio-net-pci,netdev=n0,mac={mac}",
        extra_cmdline=extra,
    )
    tapctl = [sys.executable, "-m", "tapd.tapctl", "--socket", daemon.socket_path]
    return Qemu([*tapctl, "request", "--br", "br0", "--", *single_thread_tcg(argv)])


def test_a_fenced_guest_reaches_the_bridge_only_and_a_spoofing_one_nothing(
    tenant_bridge: tuple[Daemon, bool], guest_image: GuestImage
) -> None:
    daemon, fenced = tenant_bridge
    # A answers pings once up; B pings A (its neighbour); C sends with a MAC
    # of its own choosing instead of {mac}.  Failing pings give up after
    # pingtries seconds, so the fenced run stays short.
    with (
        guest(daemon, guest_image, A, BRIDGE, "{mac}", "tapd.pingtries=30 tapd.listen=1") as a,
        # B boots alongside A and keeps trying until A is up
        guest(daemon, guest_image, B, A, "{mac}", "tapd.pingtries=40") as b,
        guest(daemon, guest_image, C, BRIDGE, "52:54:00:66:66:66", "tapd.pingtries=25") as c,
    ):
        for vm in (a, b, c):
            vm.wait_for("nic")
        # tapctl exec'd each QEMU: the grant's peer pid is the guest's QEMU
        grants = [e for e in daemon.log() if e["event"] == "request.granted"]
        macs = {e["pid"]: e["guest_mac"] for e in grants}
        assert sorted(macs) == sorted([a.pid, b.pid, c.pid])
        assert len(set(macs.values())) == 3  # tapd gave every guest its own
        # The guests that used {mac} have tapd's MAC on their NIC.
        assert a.report()["mac"] == macs[a.pid] and b.report()["mac"] == macs[b.pid]
        report_a = a.wait_for("listen")
        assert report_a.get("ping") == "ok", a.output  # its own MAC reaches the bridge
        report_b = b.wait_for("ping")
        report_c = c.wait_for("ping")
        if fenced:
            assert report_b.get("ping") == "fail", f"isolated neighbours met:\n{b.output}"
            assert report_c.get("ping") == "fail", f"a spoofed MAC got through:\n{c.output}"
        else:
            assert report_b.get("ping") == "ok", f"B:\n{b.output}\nA:\n{a.output}"
            assert report_c.get("ping") == "ok", c.output
