"""A VMM that opens its tap by name, unprivileged: ``tapctl prepare`` asks
tapd for a persistent tap and execs QEMU with ``-netdev tap,ifname=...,
script=no,downscript=no``, which opens /dev/net/tun itself as the user."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from asuser import as_user, ensure_user, private_dir, readable_copy, with_open_tun
from guest import GuestImage, parse_guest_output, qemu_argv
from tapdtest import Daemon, ip, run_daemon, taps, wait_until

BRIDGE_ADDR = "10.77.5.1"


@pytest.fixture
def user_daemon(ns: str, br0: str, tmp_path: Path) -> Iterator[Daemon]:
    entry = ensure_user()
    config = f"""
[[allow]]
users = ["{entry.pw_name}"]
bridges = ["br0"]
"""
    with run_daemon(ns, tmp_path, config) as daemon:
        os.chmod(os.path.dirname(daemon.socket_path), 0o755)
        os.chmod(daemon.socket_path, 0o666)
        yield daemon


def test_unprivileged_qemu_opens_a_prepared_tap_by_name_and_pings_the_bridge(
    user_daemon: Daemon, guest_image: GuestImage, user_venv: Path
) -> None:
    daemon = user_daemon
    ip("-n", daemon.ns, "addr", "add", f"{BRIDGE_ADDR}/24", "dev", "br0")
    guest_dir = private_dir("tapd-e2e-guest-")
    kernel, initrd = readable_copy([guest_image.kernel, guest_image.initrd], guest_dir)
    image = GuestImage(kernel=kernel, initrd=initrd)
    qemu = qemu_argv(
        image,
        "tap,id=n0,ifname={ifname},script=no,downscript=no",
        ip="10.77.5.2/24",
        ping=BRIDGE_ADDR,
        extra_cmdline="tapd.pingcount=2",
    )
    tapctl = str(user_venv / "bin/tapctl")
    argv = [
        "ip", "netns", "exec", daemon.ns,
        *with_open_tun(
            *as_user(tapctl, "--socket", daemon.socket_path, "prepare", "--br", "br0",
                     "--", *qemu)
        ),
    ]  # fmt: skip
    try:
        run = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180, cwd="/"
        )
    finally:
        subprocess.run(["rm", "-rf", str(guest_dir)], check=False)
    output = run.stdout + run.stderr
    report = parse_guest_output(output)
    assert run.returncode == 0, output
    assert report.get("ping") == "ok", output
    assert report.get("received") == "2", output

    granted = [e for e in daemon.log() if e["event"] == "request.granted"]
    assert len(granted) == 1 and granted[0]["op"] == "prepare"
    assert granted[0]["uid"] == ensure_user().pw_uid
    # QEMU was the owner (tapctl exec'd it): with it gone, tap and lease go.
    wait_until(lambda: taps(daemon.ns) == [], what="the prepared tap to go with QEMU")
    wait_until(lambda: daemon.leases() == [], what="the lease to end")
