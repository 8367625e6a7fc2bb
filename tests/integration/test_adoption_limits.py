"""fd=/fds= adoption cannot be turned against taps that are not the client's,
and a grant that is never delivered leaves no tap behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tapdtest import Daemon, links, make_tap_in, run_daemon, taps, wait_until

from tapd import client, tun

pytestmark = pytest.mark.root

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
            assert exc.value.code == "denied" and "already has a lease" in exc.value.message
            _finish(proc)
            # Its owner is gone: the lease ends, the tap is left to its maker,
            # untagged (a restarted tapd must not take it for a lease).
            wait_until(lambda: daemon.leases() == [], what="the lease to end")
            wait_until(lambda: not links(ns)["owntap"].get("ifalias"), what="the tag to go")
            assert links(ns)["owntap"]["master"] == "br0"
        finally:
            tun.close_all(fds)


def test_an_adopted_tap_whose_owner_left_while_tapd_was_down_is_left_alone(
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
            wait_until(lambda: any(
                e["event"] == "lease.reconciled" for e in second.log()
            ), what="the restart's reconcile")  # fmt: skip
            assert second.leases() == []
            (done,) = [e for e in second.log() if e["event"] == "lease.reconciled"]
            assert (done["kept"], done["removed"], done["forgotten"]) == (0, 0, 1)
            # The client's tap: still there, still on its bridge, untagged.
            link = links(ns)["kepttap"]
            assert link["master"] == "br0" and not link.get("ifalias")
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
