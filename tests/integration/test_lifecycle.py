"""Leases from grant to the tap's end, across tapd crashes and restarts."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tapdtest import Daemon, links, run_daemon, taps, wait_until

from tapd import client

#: a process that asks tapd for a tap, optionally makes it persistent, prints
#: the reply's lease and ifname, and holds the fd until its stdin closes
HOLDER = """
import fcntl, sys
from tapd import client, tun
grant = client.request_tap(path=sys.argv[1], br="br0")
if sys.argv[2] == "persist":
    fcntl.ioctl(grant.tap_fds[0], tun.TUNSETPERSIST, 1)
print(grant.reply["lease"], grant.ifname, flush=True)
sys.stdin.read()
"""


class Holder:
    def __init__(self, daemon_socket: str, persist: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, daemon_socket, "persist" if persist else "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.lease, self.ifname = self.proc.stdout.readline().split()

    def exit(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


def lease_ids(daemon: Daemon) -> list[str]:
    return [lease["id"] for lease in daemon.leases()]


def test_a_lease_lives_from_grant_until_the_vm_closes_its_fd(
    ns: str, br0: str, tmp_path: Path
) -> None:
    out = tmp_path / "down.out"
    down = tmp_path / "down.sh"
    down.write_text(f'#!/bin/sh\necho "$@" >> {out}\n')
    down.chmod(0o755)
    with run_daemon(ns, tmp_path, f'[programs]\nhooks = {{ down = "{down}" }}\n') as daemon:
        grant = daemon.request(br=br0, downscript="down")
        (lease,) = daemon.leases()
        assert lease["id"] == grant.reply["lease"]
        assert (lease["ifname"], lease["bridge"], lease["uid"]) == (grant.ifname, br0, 0)
        assert lease["pid"] == os.getpid() and lease["downscript"] == "down"
        assert not out.exists()
        grant.close()
        wait_until(lambda: daemon.leases() == [], what="the lease to end")
        wait_until(out.exists, what="the downscript")
        assert out.read_text().split() == [grant.ifname]
        ended = [e for e in daemon.log() if e["event"] == "lease.ended"]
        assert [e["lease"] for e in ended] == [lease["id"]]


def test_a_persistent_tap_is_removed_when_its_owner_exits(daemon: Daemon) -> None:
    holder = Holder(daemon.socket_path, persist=True)
    assert links(daemon.ns)[holder.ifname]["linkinfo"]["info_data"]["persist"] is True
    holder.exit()
    # Its fd is closed, but TUNSETPERSIST would keep the tap: tapd removes it.
    wait_until(lambda: holder.ifname not in links(daemon.ns), what="the persistent tap to go")
    wait_until(lambda: daemon.leases() == [], what="the lease to end")
    events = {e["event"] for e in daemon.log() if e.get("lease") == holder.lease}
    assert {"lease.owner.exited", "lease.ended"} <= events


def test_release_removes_a_live_tap(daemon: Daemon) -> None:
    grant = daemon.request(br="br0")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "tapd.tapctl", "--socket", daemon.socket_path,
             "release", grant.ifname],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert grant.reply["lease"] in result.stdout
        wait_until(lambda: grant.ifname not in links(daemon.ns), what="the tap to go")
        wait_until(lambda: daemon.leases() == [], what="the lease to end")
        with pytest.raises(client.ClientError) as exc:
            client.release(grant.reply["lease"], path=daemon.socket_path)
        assert exc.value.code == "lease-not-found"
    finally:
        grant.close()


def test_tapctl_list_and_status(daemon: Daemon) -> None:
    grant = daemon.request(br="br0", queues=2)
    try:
        table = subprocess.run(
            [sys.executable, "-m", "tapd.tapctl", "--socket", daemon.socket_path, "list"],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
        assert table[0].split() == ["LEASE", "IFNAME", "BRIDGE", "QUEUES", "UID", "PID", "AGE"]
        assert table[1].split()[:6] == [
            grant.reply["lease"],
            grant.ifname,
            "br0",
            "2",
            "0",
            str(os.getpid()),
        ]
        status = client.status(path=daemon.socket_path)
        assert status["leases"] == 1 and status["connections"] == 1
    finally:
        grant.close()


def test_sigkill_and_restart_keeps_leases_and_leaves_vms_alone(
    ns: str, br0: str, tmp_path: Path
) -> None:
    (tmp_path / "again").mkdir()
    with run_daemon(ns, tmp_path) as first:
        holder = Holder(first.socket_path)
        before = first.leases()
        first.stop(signal.SIGKILL)
    try:
        # The VM's tap is untouched by the crash.
        assert links(ns)[holder.ifname]["master"] == br0
        with run_daemon(ns, tmp_path / "again") as second:
            wait_until(lambda: second.leases() != [], what="leases to be rebuilt")
            (lease,) = second.leases()
            assert lease == before[0]
            assert links(ns)[holder.ifname]["master"] == br0
            holder.exit()
            wait_until(lambda: second.leases() == [], what="the lease to end with its VM")
            assert taps(ns) == []
    finally:
        if holder.proc.poll() is None:
            holder.exit()


def test_restart_removes_taps_whose_owner_died_meanwhile(ns: str, br0: str, tmp_path: Path) -> None:
    (tmp_path / "again").mkdir()
    with run_daemon(ns, tmp_path) as first:
        holder = Holder(first.socket_path, persist=True)
        first.stop(signal.SIGKILL)
    holder.exit()  # its persistent tap outlives it, with no tapd to notice
    assert holder.ifname in links(ns)
    with run_daemon(ns, tmp_path / "again") as second:
        wait_until(lambda: holder.ifname not in links(ns), what="reconcile to remove the tap")
        assert second.leases() == []
        gone = [e for e in second.log() if e["event"] == "lease.owner.gone"]
        assert [e["lease"] for e in gone] == [holder.lease]


def test_sigkill_during_a_burst_leaves_no_half_made_tap(ns: str, br0: str, tmp_path: Path) -> None:
    (tmp_path / "again").mkdir()
    stop = threading.Event()

    def hammer(path: str) -> None:
        while not stop.is_set():
            with contextlib.suppress(client.ClientError, OSError):
                client.request_tap(path=path, br=br0, queues=4).close()

    with run_daemon(ns, tmp_path) as first:
        threads = [threading.Thread(target=hammer, args=(first.socket_path,)) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        first.stop(signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join()
    # Every client closed what it got; what tapd held died with it.
    wait_until(lambda: taps(ns) == [], what="no tap left after the crash")
    with run_daemon(ns, tmp_path / "again") as second:
        assert second.leases() == []
        second.request(br=br0).close()  # and it serves
    wait_until(lambda: taps(ns) == [], what="no tap left")


def test_sd_notify_ready_status_watchdog_stopping(ns: str, br0: str, tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(path)
    notify.settimeout(15)
    os.environ["NOTIFY_SOCKET"] = path
    os.environ["WATCHDOG_USEC"] = "200000"
    try:
        with run_daemon(ns, tmp_path) as daemon:
            first = notify.recv(4096).decode().split("\n")
            assert first[0] == "READY=1" and first[1].startswith("STATUS=serving")
            assert notify.recv(4096) == b"WATCHDOG=1"
            assert notify.recv(4096) == b"WATCHDOG=1"
            daemon.stop(signal.SIGTERM)
            rest = []
            while True:
                try:
                    rest.append(notify.recv(4096).decode())
                except TimeoutError:
                    break
                if rest[-1].startswith("STOPPING=1"):
                    break
            assert rest[-1].split("\n") == ["STOPPING=1", "STATUS=stopping"]
    finally:
        del os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"]
        notify.close()
