"""fd=/fds= adoption cannot be turned against taps that are not the client's,
and a grant that is never delivered leaves no tap behind."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tapdtest import Daemon, ip, links, make_tap_in, run_daemon, taps, wait_until

from tapd import client, tun

NOBODY = 65534

#: runs as uid NOBODY: adopt the tap whose fd (argv[2]) it inherited onto br0
AS_NOBODY = """
import json, os, sys
from tapd import client
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
fd = int(sys.argv[2])
try:
    reply, _ = client.call({"op": "request", "fd": "t", "br": "br0"}, path=sys.argv[1], fds=[fd])
    print(json.dumps({"ok": True, "lease": reply["lease"]}), flush=True)
except client.ClientError as exc:
    print(json.dumps({"ok": False, "code": exc.code, "message": exc.message}), flush=True)
sys.stdin.read()
"""

CONFIG = '[[allow]]\nusers = ["0", "65534"]\nbridges = ["br0"]\n'


def _open_to_all(daemon: Daemon) -> None:
    os.chmod(os.path.dirname(daemon.socket_path), 0o755)
    os.chmod(daemon.socket_path, 0o666)


def _adopt_as_nobody(daemon: Daemon, fd: int) -> tuple[dict[str, object], subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", AS_NOBODY, daemon.socket_path, str(fd)],
        pass_fds=[fd],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return json.loads(proc.stdout.readline()), proc


def _finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.wait(timeout=10)
    proc.stdout.close()


def test_a_tap_without_an_owner_cannot_be_adopted_by_another_uid(
    ns: str, br0: str, tmp_path: Path
) -> None:
    # Anyone may attach to a tap that has no owner: an fd proves nothing.
    with run_daemon(ns, tmp_path, CONFIG) as daemon:
        _open_to_all(daemon)
        fds = make_tap_in(ns, "admtap")
        try:
            result, proc = _adopt_as_nobody(daemon, fds[0])
            _finish(proc)
            assert result["ok"] is False and result["code"] == "denied", result
            assert "not yours" in str(result["message"])
            link = links(ns)["admtap"]
            assert "master" not in link and not link.get("ifalias")
        finally:
            tun.close_all(fds)


def test_a_clients_own_tap_is_adopted_and_outlives_its_lease(
    ns: str, br0: str, tmp_path: Path
) -> None:
    with run_daemon(ns, tmp_path, CONFIG) as daemon:
        _open_to_all(daemon)
        fds = make_tap_in(ns, "owntap")
        try:
            tun.set_owner(fds[0], NOBODY)
            result, proc = _adopt_as_nobody(daemon, fds[0])
            assert result["ok"] is True, result
            assert links(ns)["owntap"]["master"] == "br0"
            (lease,) = daemon.leases()
            assert lease["adopted"] is True and lease["uid"] == NOBODY
            # Adopting it again (re-leasing a leased tap) is refused.
            with pytest.raises(client.ClientError) as exc:
                daemon.call({"op": "request", "fd": "3", "br": "br0"}, fds=fds)
            assert exc.value.code == "tap-leased" and "already has a lease" in exc.value.message
            _finish(proc)
            # Its owner is gone but a process (this one) holds the tap: the
            # lease stays, the tap stays on its bridge.
            wait_until(lambda: _logged(daemon, "lease.kept"), what="tapd to see the tap in use")
            assert [x["id"] for x in daemon.leases()] == [lease["id"]]
            assert links(ns)["owntap"]["master"] == "br0"
            # Its last holder goes (the tap stays: it is persistent): it is
            # given back to its maker, off the bridge and untagged, not removed.
            fcntl.ioctl(fds[0], tun.TUNSETPERSIST, 1)
            tun.close_all(fds)
            wait_until(lambda: daemon.leases() == [], what="the lease to end")
            link = links(ns)["owntap"]
            assert "master" not in link and not link.get("ifalias")
        finally:
            tun.close_all(fds)
            ip("-n", ns, "link", "del", "owntap", check=False)


def _logged(daemon: Daemon, event: str) -> bool:
    return any(e["event"] == event for e in daemon.log())


def test_an_adopted_tap_whose_owner_left_while_tapd_was_down_keeps_its_lease_while_held(
    ns: str, br0: str, tmp_path: Path
) -> None:
    fds = make_tap_in(ns, "kepttap")
    try:
        tun.set_owner(fds[0], NOBODY)
        with run_daemon(ns, tmp_path, CONFIG) as first:
            _open_to_all(first)
            result, proc = _adopt_as_nobody(first, fds[0])
            assert result["ok"] is True, result
            assert links(ns)["kepttap"].get("ifalias", "").startswith("tapd:1 ")
            first.proc.kill()  # no clean stop: the tag stays on the tap
            first.proc.wait(timeout=10)
        _finish(proc)  # the owner goes while no tapd runs
        (tmp_path / "second").mkdir()
        with run_daemon(ns, tmp_path / "second", CONFIG) as second:
            wait_until(lambda: _logged(second, "lease.reconciled"), what="the rebuild")
            # This process still holds the tap: its lease is rebuilt.
            (lease,) = second.leases()
            assert lease["id"] == result["lease"] and lease["adopted"] is True
            assert links(ns)["kepttap"]["master"] == "br0"
            tun.close_all(fds)  # not persistent: the kernel removes it
            wait_until(lambda: second.leases() == [], what="the lease to end")
    finally:
        tun.close_all(fds)


def test_an_adopted_tap_nobody_holds_after_a_restart_is_given_back(
    ns: str, br0: str, tmp_path: Path
) -> None:
    fds = make_tap_in(ns, "backtap")
    try:
        tun.set_owner(fds[0], NOBODY)
        with run_daemon(ns, tmp_path, CONFIG) as first:
            _open_to_all(first)
            result, proc = _adopt_as_nobody(first, fds[0])
            assert result["ok"] is True, result
            # Made persistent once adopted (tapd adopts only a fresh tap): it
            # outlives every fd, so nobody holds it after the restart.
            fcntl.ioctl(fds[0], tun.TUNSETPERSIST, 1)
            first.proc.kill()
            first.proc.wait(timeout=10)
        _finish(proc)
        tun.close_all(fds)  # nobody holds it now; it persists
        (tmp_path / "second").mkdir()
        with run_daemon(ns, tmp_path / "second", CONFIG) as second:
            wait_until(lambda: _logged(second, "lease.reconciled"), what="the rebuild")
            assert second.leases() == []
            link = links(ns)["backtap"]
            assert "master" not in link and not link.get("ifalias")
    finally:
        tun.close_all(fds)
        ip("-n", ns, "link", "del", "backtap", check=False)


def test_release_of_an_adopted_lease_gives_the_tap_back(ns: str, br0: str, tmp_path: Path) -> None:
    with run_daemon(ns, tmp_path, CONFIG) as daemon:
        fds = make_tap_in(ns, "reltap")
        try:
            reply, _ = daemon.call({"op": "request", "fd": "3", "br": "br0"}, fds=fds)
            assert links(ns)["reltap"]["master"] == "br0"
            client.release(reply["lease"], path=daemon.socket_path)
            assert daemon.leases() == []
            # The client's tap: still there, its fd still works, off the
            # bridge and untagged.
            link = links(ns)["reltap"]
            assert "master" not in link and not link.get("ifalias")
            assert tun.tap_info(fds[0]).name == "reltap"
            ended = [e for e in daemon.log() if e["event"] == "lease.ended"]
            assert [(e["lease"], e["reason"]) for e in ended] == [(reply["lease"], "released")], (
                "\n".join(map(str, daemon.log()))
            )
        finally:
            tun.close_all(fds)


def test_a_non_socket_fd_with_bridge_helper_is_refused_and_closed(daemon: Daemon) -> None:
    before = daemon.warm_fds()
    r, w = os.pipe()
    try:
        for _ in range(50):
            with pytest.raises(client.ClientError) as exc:
                daemon.call({"op": "bridge-helper", "br": "br0"}, fds=[r])
            assert exc.value.code == "denied"
    finally:
        os.close(r)
        os.close(w)
    wait_until(lambda: daemon.pid_fds() == before, what="daemon fds back to baseline")


def test_sigterm_lets_a_request_in_flight_finish(ns: str, br0: str, tmp_path: Path) -> None:
    slow = tmp_path / "slow.sh"
    slow.write_text("#!/bin/sh\nsleep 1.5\n")
    slow.chmod(0o755)
    config = f'[programs]\nhooks = {{ slow = "{slow}" }}\n'
    with run_daemon(ns, tmp_path, config) as daemon:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tapd.tapctl", "--socket", daemon.socket_path,
             "request", "--br", br0, "--script", "slow", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_until(_script_running, timeout=10, what="the request's script to start")
        daemon.proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert json.loads(out)["ifname"].startswith("tap")
        assert daemon.proc.wait(timeout=20) == 0
    wait_until(lambda: taps(ns) == [], what="no tap left")


def _script_running() -> bool:
    return subprocess.run(["pgrep", "-f", "slow.sh"], capture_output=True).returncode == 0
