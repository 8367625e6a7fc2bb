"""vhost-net for real, in a kernel that has it (Debian's 6.1; this machine's
own has no /dev/vhost-net): the vhost fds tapd hands out beside the tap fds
are taken by an unmodified QEMU, whose guest's traffic then runs through
the kernel's vhost workers.

In 6.1 each vhost-net device a process owns (VHOST_SET_OWNER, which QEMU
issues on every vhost fd it uses) has one kernel worker thread named
``vhost-<owner's pid>``, so the workers of a QEMU are counted by name.  A
QEMU guest booted inside the stage is TCG inside TCG: each boot costs about
a minute, so each test boots one guest and checks all it can on it.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from guest import GuestImage, build_guest, parse_guest_output, qemu_argv
from tapdtest import Daemon, ip, links, make_tap_in, taps, wait_until

from tapd import client, tun

pytestmark = [pytest.mark.root, pytest.mark.vhost_net]

BRIDGE_ADDR = "10.77.3.1"
#: _IOR(VHOST_VIRTIO, 0x00, __u64): only a vhost device answers it
VHOST_GET_FEATURES = 0x8008AF00
VIRTIO_NET_F_MRG_RXBUF = 1 << 15


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    return build_guest()


def vhost_workers(pid: int) -> int:
    """How many vhost worker threads ``pid`` owns."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                count += (entry / "comm").read_text().strip() == f"vhost-{pid}"
            except OSError:
                continue
    return count


def run_vm(argv: list[str], pass_fds: tuple[int, ...] = ()) -> tuple[str, int, int]:
    """Run ``argv`` (tapctl, which execs QEMU in its own process) to its end:
    the guest's output, QEMU's exit status and the most vhost workers its
    process owned at once."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        pass_fds=pass_fds,
    )  # fmt: skip
    most = 0
    deadline = time.monotonic() + 400
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            most = max(most, vhost_workers(proc.pid))
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, _ = proc.communicate()
    return out.decode(errors="replace"), proc.returncode, most


def tapctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "tapd.tapctl", *args]


def test_vhost_fds_are_the_real_device_after_the_tap_fds(daemon: Daemon) -> None:
    grant = daemon.request(br="br0", queues=3, vhost=True, vhostforce=True, **{"poll_us": 50})
    try:
        assert grant.reply["fds"] == 3 and grant.reply["vhostfds"] == 3
        assert grant.reply["warnings"] == []
        assert {tun.tap_info(fd).name for fd in grant.tap_fds} == {grant.ifname}
        rdev = os.stat("/dev/vhost-net").st_rdev
        for fd in grant.vhost_fds:
            assert os.fstat(fd).st_rdev == rdev
            features = int.from_bytes(fcntl.ioctl(fd, VHOST_GET_FEATURES, bytes(8)), "little")
            assert features & VIRTIO_NET_F_MRG_RXBUF
        assert grant.netdev_args().startswith("fds=") and "vhostfds=" in grant.netdev_args()
    finally:
        grant.close()


def test_a_two_queue_vhost_tap_carries_a_real_guest_with_a_worker_per_queue(
    daemon: Daemon, guest_image: GuestImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    ip("-n", daemon.ns, "addr", "add", f"{BRIDGE_ADDR}/24", "dev", "br0")
    monkeypatch.setenv("TAPD_SOCKET", daemon.socket_path)
    qemu = qemu_argv(
        guest_image,
        "tap,id=n0,fds={fds},vhost=on,vhostfds={vhostfds}",
        device="virtio-net-pci,netdev=n0,mq=on,vectors=6",
        smp=2,
        ip="10.77.3.2/24",
        ping=BRIDGE_ADDR,
        extra_cmdline="tapd.pingcount=3 tapd.wait=3",
    )
    output, status, workers = run_vm(
        tapctl("request", "--br", "br0", "--queues", "2", "--vhost", "--", *qemu)
    )
    report = parse_guest_output(output)
    assert status == 0, output
    assert report.get("ping") == "ok" and report.get("received") == "3", output
    assert report.get("rxqueues") == "2" and report.get("txqueues") == "2", output
    assert workers == 2, output
    assert [e["event"] for e in daemon.log()].count("request.granted") == 1
    # QEMU held the only fds: the lease ends with the VM.
    wait_until(lambda: taps(daemon.ns) == [], what="the tap to go with QEMU")
    wait_until(lambda: client.leases(path=daemon.socket_path) == [], what="the lease to end")


def test_an_adopted_tap_gets_vhost_fds_a_real_guest_runs_on(
    daemon: Daemon, guest_image: GuestImage
) -> None:
    # The VMM's manager made the tap itself (fd=) and asks tapd for the
    # bridge and a vhost fd: a single queue, so this is also the one-queue case.
    ip("-n", daemon.ns, "addr", "add", f"{BRIDGE_ADDR}/24", "dev", "br0")
    tap_fds = make_tap_in(daemon.ns, "owntap")
    try:
        grant = daemon.request(fd="t", br="br0", vhost=True, send_fds=tap_fds)
        assert grant.reply["vhostfds"] == 1 and grant.reply["warnings"] == []
        (vhost_fd,) = grant.vhost_fds
        assert os.fstat(vhost_fd).st_rdev == os.stat("/dev/vhost-net").st_rdev
        assert links(daemon.ns)["owntap"]["master"] == "br0"
        qemu = qemu_argv(
            guest_image,
            f"tap,id=n0,fd={tap_fds[0]},vhost=on,vhostfd={vhost_fd}",
            ip="10.77.3.3/24",
            ping=BRIDGE_ADDR,
            extra_cmdline="tapd.pingcount=3 tapd.wait=3",
        )
        output, status, workers = run_vm(qemu, pass_fds=(tap_fds[0], vhost_fd))
        grant.close()
        report = parse_guest_output(output)
        assert status == 0, output
        assert report.get("ping") == "ok" and report.get("received") == "3", output
        assert workers == 1, output
        # This process still holds the tap it made: the lease lasts until it
        # lets go, then the tap is given back to it, off the bridge.
        (lease,) = client.leases(path=daemon.socket_path)
        assert lease["adopted"] is True
        tun.close_all(tap_fds)
        tap_fds = []
        wait_until(lambda: client.leases(path=daemon.socket_path) == [], what="the lease to end")
    finally:
        tun.close_all(tap_fds)
        ip("-n", daemon.ns, "link", "del", "owntap", check=False)
    assert taps(daemon.ns) == []
