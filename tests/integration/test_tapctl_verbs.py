"""Every tapctl verb against a real tapd on its built-in defaults (no config
file: the quick start's first minutes), human and --json, as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tapdtest import Daemon, links, taps, wait_until

BIN = Path(sys.executable).parent


def tapctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [str(BIN / "tapctl"), "--socket", daemon.socket_path, *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "Traceback" not in out.stderr
    return out


def test_status_on_the_built_in_defaults(daemon: Daemon) -> None:
    human = tapctl(daemon, "status")
    assert human.returncode == 0, human.stderr
    assert "config (built-in defaults)" in human.stdout
    as_json = json.loads(tapctl(daemon, "status", "--json").stdout)
    assert as_json["ok"] is True and "config" not in as_json


def test_hello_human_and_json(daemon: Daemon) -> None:
    assert "ops hello, request" in tapctl(daemon, "hello").stdout
    assert "request" in json.loads(tapctl(daemon, "hello", "--json").stdout)["ops"]


def test_request_list_release_human_and_json(daemon: Daemon) -> None:
    """A tap held by a command tapctl runs, listed and released from outside."""
    holder = subprocess.Popen(
        [str(BIN / "tapctl"), "--socket", daemon.socket_path, "request", "--br", "br0",
         "--", "sh", "-c", "echo {ifname}; exec sleep 60"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        ifname = holder.stdout.readline().strip()
        assert links(daemon.ns)[ifname]["master"] == "br0"
        listed = json.loads(tapctl(daemon, "list", "--json").stdout)
        assert [x["ifname"] for x in listed] == [ifname]
        table = tapctl(daemon, "list").stdout.splitlines()
        assert table[0].split() == ["LEASE", "IFNAME", "BRIDGE", "QUEUES", "UID", "PID", "AGE"]
        assert table[1].split()[1:4] == [ifname, "br0", "1"]
        released = json.loads(tapctl(daemon, "release", ifname, "--json").stdout)
        assert released["ifname"] == ifname
        wait_until(lambda: ifname not in taps(daemon.ns), what="the released tap to go")
        again = tapctl(daemon, "release", ifname)
        assert again.returncode == 1 and again.stderr.endswith("[lease-not-found]\n")
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


@pytest.mark.parametrize("form", [[], ["--json"]])
def test_request_without_a_command(daemon: Daemon, form: list[str]) -> None:
    out = tapctl(daemon, "request", "--br", "br0", *form)
    assert out.returncode == 0, out.stderr
    if form:
        assert json.loads(out.stdout)["bridge"] == "br0"
    else:
        assert ": bridge br0 mac fe:" in out.stdout


def test_bridge_helper_through_the_real_daemon(daemon: Daemon) -> None:
    ours, qemus = socket.socketpair()
    with ours, qemus:
        out = subprocess.run(
            [str(BIN / "tapd-bridge-helper"), "--use-vnet", f"--fd={qemus.fileno()}", "--br=br0"],
            env={**os.environ, "TAPD_SOCKET": daemon.socket_path},
            pass_fds=[qemus.fileno()], capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        data, ancdata, _, _ = ours.recvmsg(16, socket.CMSG_SPACE(4))
    assert data == b"\0"
    fd = int.from_bytes(ancdata[0][2][:4], sys.byteorder)
    try:
        assert [x["pid"] for x in json.loads(tapctl(daemon, "list", "--json").stdout)] == [
            os.getpid()  # the helper's parent, as QEMU would be
        ]
    finally:
        os.close(fd)
