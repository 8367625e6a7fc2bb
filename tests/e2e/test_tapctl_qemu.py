"""The whole path with a real VMM: tapctl asks tapd for a tap, execs QEMU with
the fd, and the guest behind it pings the bridge."""

from __future__ import annotations

import sys

import pytest
from guest import GuestImage, parse_guest_output, qemu_argv, run_qemu
from tapdtest import Daemon, ip, taps, wait_until

BRIDGE_ADDR = "10.77.1.1"


def test_tapctl_request_runs_qemu_and_the_guest_pings_the_bridge(
    daemon: Daemon, guest_image: GuestImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    ip("-n", daemon.ns, "addr", "add", f"{BRIDGE_ADDR}/24", "dev", "br0")
    # Every client finds the daemon through $TAPD_SOCKET.
    monkeypatch.setenv("TAPD_SOCKET", daemon.socket_path)
    qemu = qemu_argv(
        guest_image,
        "tap,id=n0,fd={fd}",
        ip="10.77.1.2/24",
        ping=BRIDGE_ADDR,
        extra_cmdline="tapd.pingcount=3",
    )
    run = run_qemu(
        [sys.executable, "-m", "tapd.tapctl", "request", "--br", "br0", "--", *qemu],
        timeout=120,
    )

    report = parse_guest_output(run.output)
    assert run.returncode == 0, run.output
    assert report.get("ping") == "ok", run.output
    assert report.get("received") == "3", run.output
    assert "done" in report, run.output
    granted = [e for e in daemon.log() if e["event"] == "request.granted"]
    assert len(granted) == 1
    # QEMU held the only copy of the fd: with QEMU gone, so is the tap.
    wait_until(lambda: taps(daemon.ns) == [], what="the tap to vanish after QEMU exits")


def test_qemu_is_not_started_when_tapd_refuses(daemon: Daemon, guest_image: GuestImage) -> None:
    qemu = qemu_argv(guest_image, "tap,id=n0,fd={fd}", ip="10.77.1.2/24", ping="")
    run = run_qemu(
        [
            sys.executable, "-m", "tapd.tapctl", "--socket", daemon.socket_path,
            "request", "--br", "nosuchbr", "--", *qemu,
        ],
        timeout=30,
    )  # fmt: skip
    assert run.returncode == 1
    assert "bridge 'nosuchbr' does not exist" in run.output
    assert "TAPD-GUEST" not in run.output
