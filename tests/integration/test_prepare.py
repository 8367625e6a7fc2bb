"""The prepare op: a persistent tap a VMM opens itself by name, owned by the
requesting uid, that lives exactly as long as the requesting process.

Clients run as other uids (the kernel's owner check is what keeps everyone
else off a prepared tap); they drop to that uid themselves after importing
tapd, because this interpreter may live where other uids cannot read it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tapdtest import Daemon, ip, links, run_daemon, taps, wait_until

REPO = str(Path(__file__).resolve().parents[2])
U1, U2 = 4251, 4252

# Runs as uid argv[2]: answers one JSON line per stdin line.
#   {"prepare": {...}}  -> the reply (or the error) of a prepare op
#   {"attach": NAME, "mq": bool} -> TUNSETIFF-attaches a /dev/net/tun fd to
#                                  NAME as a VMM would, holding the fd
# and exits when stdin ends (or on {"exit": true}).
_CLIENT = r"""
import fcntl, json, os, struct, sys
sys.path.insert(0, sys.argv[1])
from tapd import client, tun
uid = int(sys.argv[2])
# /dev/net/tun is 0600 on some hosts (0666 on Debian's): open it while still
# root. The kernel's owner check on TUNSETIFF uses the caller's credentials
# at that moment, which are the dropped ones.
spare = [os.open("/dev/net/tun", os.O_RDWR) for _ in range(6)]
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
path = sys.argv[3]
held = []
print(json.dumps({"uid": os.getuid()}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if "prepare" in cmd:
        try:
            out = {"ok": True, "reply": client.prepare_tap(path=path, **cmd["prepare"])}
        except client.ClientError as exc:
            out = {"ok": False, "code": exc.code, "message": exc.message}
    elif "attach" in cmd:
        flags = tun.IFF_TAP | tun.IFF_NO_PI | (tun.IFF_MULTI_QUEUE if cmd["mq"] else 0)
        fd = spare.pop()
        try:
            fcntl.ioctl(fd, tun.TUNSETIFF, struct.pack("16sH22x", cmd["attach"].encode(), flags))
            held.append(fd)
            out = {"ok": True}
        except OSError as exc:
            os.close(fd)
            out = {"ok": False, "errno": exc.errno}
    else:
        break
    print(json.dumps(out), flush=True)
"""


class Vmm:
    """A process of another uid standing in for a VMM that opens its tap by name."""

    def __init__(self, daemon: Daemon, uid: int) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", daemon.ns, sys.executable, "-c", _CLIENT, REPO, str(uid),
             daemon.socket_path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )  # fmt: skip
        assert self._read() == {"uid": uid}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the client process died"
        return dict(json.loads(line))

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def prepare(self, **options: Any) -> dict[str, Any]:
        return self.ask({"prepare": options})

    def exit(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


@pytest.fixture
def shared(ns: str, br0: str, tmp_path: Path) -> Iterator[Daemon]:
    ip("-n", ns, "link", "add", "br1", "type", "bridge")
    config = f"""
[[allow]]
users = ["{U1}", "{U2}"]
bridges = ["br0"]
max_queues = 4
max_taps = 2
"""
    with run_daemon(ns, tmp_path, config) as daemon:
        os.chmod(os.path.dirname(daemon.socket_path), 0o755)
        os.chmod(daemon.socket_path, 0o666)
        yield daemon


@pytest.fixture
def vmms() -> Iterator[list[Vmm]]:
    made: list[Vmm] = []
    yield made
    for vmm in made:
        vmm.exit()


def tun_data(ns: str, name: str) -> dict[str, Any]:
    return dict(links(ns)[name]["linkinfo"]["info_data"])


def test_a_prepared_tap_is_the_requesters_own_persistent_port_until_it_exits(
    shared: Daemon, vmms: list[Vmm]
) -> None:
    vmms.append(owner := Vmm(shared, U1))
    got = owner.prepare(br="br0", ifname="vm1")
    assert got["ok"], got
    reply = got["reply"]
    assert reply["ifname"] == "vm1" and reply["bridge"] == "br0" and reply["queues"] == 1
    assert reply["mtu"] == 1400

    link = links(shared.ns)["vm1"]
    info = tun_data(shared.ns, "vm1")
    assert info["persist"] is True and info["user"] == U1 and info["multi_queue"] is False
    assert link["master"] == "br0" and "UP" in link["flags"]
    assert link["address"] == reply["mac"]
    (lease,) = shared.leases()
    assert lease["ifname"] == "vm1" and lease["uid"] == U1 and lease["prepared"] is True

    # The owner (the VMM) opens it by name without privilege (a single-queue
    # tap refuses a second queue: tapd kept none of its own); nobody else may.
    assert owner.ask({"attach": "vm1", "mq": False}) == {"ok": True}
    vmms.append(stranger := Vmm(shared, U2))
    assert stranger.ask({"attach": "vm1", "mq": False}) == {"ok": False, "errno": errno.EPERM}

    owner.exit()
    wait_until(lambda: "vm1" not in taps(shared.ns), what="the prepared tap to go with its owner")
    wait_until(lambda: shared.leases() == [], what="the lease to end")
    ended = [e for e in shared.log() if e["event"] == "lease.ended"]
    assert [e["ifname"] for e in ended] == ["vm1"]


def test_a_requester_that_exits_without_opening_its_tap_leaves_nothing(
    shared: Daemon, vmms: list[Vmm]
) -> None:
    vmms.append(owner := Vmm(shared, U1))
    assert owner.prepare(br="br0")["ok"]
    assert len(taps(shared.ns)) == 1
    owner.exit()
    wait_until(lambda: taps(shared.ns) == [], what="the unopened prepared tap to go")
    wait_until(lambda: shared.leases() == [], what="its lease to end")


def test_a_multi_queue_prepared_tap_takes_the_vmms_queues(shared: Daemon, vmms: list[Vmm]) -> None:
    vmms.append(owner := Vmm(shared, U1))
    got = owner.prepare(br="br0", ifname="vmq", queues=4)
    assert got["ok"] and got["reply"]["queues"] == 4, got
    assert tun_data(shared.ns, "vmq")["multi_queue"] is True
    for _ in range(4):
        assert owner.ask({"attach": "vmq", "mq": True}) == {"ok": True}
    assert tun_data(shared.ns, "vmq")["numqueues"] == 4


def test_release_removes_a_prepared_tap_at_once(shared: Daemon, vmms: list[Vmm]) -> None:
    vmms.append(owner := Vmm(shared, U1))
    lease = owner.prepare(br="br0", ifname="vmr")["reply"]["lease"]
    reply, _ = shared.call({"op": "release", "lease": lease})
    assert reply["lease"]["ifname"] == "vmr"
    wait_until(lambda: taps(shared.ns) == [], what="the released tap to go")
    assert owner.proc.poll() is None  # the owner lives on: release alone ended it


def test_prepare_refuses_names_that_exist_policy_and_quota_like_request(
    shared: Daemon, vmms: list[Vmm]
) -> None:
    vmms.append(owner := Vmm(shared, U1))
    assert owner.prepare(br="br0", ifname="vmx")["ok"]
    taken = owner.prepare(br="br0", ifname="vmx")
    assert taken["code"] == "ifname-taken", taken
    # an existing non-tap interface is never adopted either
    assert owner.prepare(br="br0", ifname="br1")["code"] == "ifname-taken"
    assert owner.prepare(br="br1")["code"] == "denied"
    assert owner.prepare(br="br0", queues=8)["code"] == "denied"
    assert owner.prepare(br="br0")["ok"]
    over = owner.prepare(br="br0")
    assert over["code"] == "quota-exceeded", over  # max_taps = 2 counts prepared taps
    assert len(taps(shared.ns)) == 2


@pytest.mark.parametrize(
    ("key", "value"),
    [("fd", "3"), ("fds", "3:4"), ("helper", "qemu"), ("sndbuf", 1024), ("vhost", True),
     ("vhostforce", True), ("poll-us", 10)],
)  # fmt: skip
def test_prepare_refuses_keys_that_cannot_apply_to_a_tap_opened_by_name(
    daemon: Daemon, key: str, value: Any
) -> None:
    (reply,) = daemon.raw(json.dumps({"op": "prepare", "br": "br0", key: value}).encode() + b"\n")
    assert reply["ok"] is False
    assert reply["error"]["code"] == "option-not-applicable", reply
    assert key in reply["error"]["message"]
    assert taps(daemon.ns) == []
