"""Prove the QEMU guest fixture works on its own, without tapd.

A bridge with an address lives in a private network namespace; QEMU runs
inside that namespace and opens a persistent tap enslaved to the bridge by
name.  The guest must come up, report one RX queue and get a ping reply from
the bridge address.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from guest import (
    GuestImage,
    parse_guest_output,
    qemu_argv,
    run_qemu,
)
from tapdtest import netns

BRIDGE_ADDR = "10.77.0.1"
GUEST_ADDR = "10.77.0.2/24"
TAP = "tapg0"
BOOT_TIMEOUT = 120.0


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


@pytest.fixture
def bridged_tap_ns() -> Iterator[str]:
    """A netns holding br0 (with BRIDGE_ADDR) and a persistent tap on it."""
    with netns() as ns:
        ip("-n", ns, "link", "add", "br0", "type", "bridge")
        ip("-n", ns, "addr", "add", f"{BRIDGE_ADDR}/24", "dev", "br0")
        ip("-n", ns, "link", "set", "br0", "up")
        ip("-n", ns, "tuntap", "add", "dev", TAP, "mode", "tap")
        ip("-n", ns, "link", "set", TAP, "master", "br0")
        ip("-n", ns, "link", "set", TAP, "up")
        yield ns  # deleting the netns removes br0 and the tap


def test_guest_pings_bridge(guest_image: GuestImage, bridged_tap_ns: str) -> None:
    argv = qemu_argv(
        guest_image,
        f"tap,id=n0,ifname={TAP},script=no,downscript=no",
        ip=GUEST_ADDR,
        ping=BRIDGE_ADDR,
        extra_cmdline="tapd.pingcount=3",
    )
    run = run_qemu(["ip", "netns", "exec", bridged_tap_ns, *argv], timeout=BOOT_TIMEOUT)

    report = parse_guest_output(run.output)
    assert run.returncode == 0, (
        f"QEMU exit {run.returncode} after {run.elapsed:.1f}s:\n{run.output}"
    )
    assert report.get("ping") == "ok", run.output
    assert report.get("rxqueues") == "1", run.output
    assert report.get("received") == "3", run.output
    assert report.get("mac", "").startswith("52:54:00:"), run.output
    assert "done" in report, run.output
