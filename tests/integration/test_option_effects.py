"""Every NetdevTapOptions field doing in the kernel what QEMU would have done."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from tapdtest import Daemon, ip, links, make_tap_in, netns, run_daemon, taps, wait_until

from tapd import client, protocol, tun

QEMU_BRIDGE_HELPER = "/usr/lib/qemu/qemu-bridge-helper"


def refused(daemon: Daemon, code: str, **options: object) -> str:
    with pytest.raises(client.ClientError) as exc:
        daemon.request(**options).close()
    assert exc.value.code == code, exc.value.message
    assert taps(daemon.ns) == []
    return exc.value.message


# -- vnet_hdr and sndbuf --------------------------------------------------------


@pytest.mark.parametrize("wanted", [None, True, False])
def test_vnet_hdr_absent_required_or_off(daemon: Daemon, wanted: bool | None) -> None:
    grant = daemon.request(br="br0", vnet_hdr=wanted)
    try:
        expect = wanted is not False  # this kernel offers IFF_VNET_HDR
        info = tun.tap_info(grant.tap_fds[0])
        assert info.vnet_hdr is expect
        assert grant.reply["vnet_hdr"] is expect
        assert grant.reply["vnet_hdr_len"] == (tun.VIRTIO_NET_HDR_LEN if expect else 0)
        data = links(daemon.ns)[grant.ifname]["linkinfo"]["info_data"]
        assert data["vnet_hdr"] is expect
        assert grant.reply["offloads"] == 0
    finally:
        grant.close()


@pytest.mark.parametrize(
    ("sndbuf", "expect"),
    [(None, 0x7FFF_FFFF), (0, 0x7FFF_FFFF), (65536, 65536), (1 << 40, 0x7FFF_FFFF)],
)
def test_sndbuf_is_defaulted_and_clamped_as_qemu_does(
    daemon: Daemon, sndbuf: int | None, expect: int
) -> None:
    grant = daemon.request(br="br0", sndbuf=sndbuf, queues=2)
    try:
        assert [tun.get_sndbuf(fd) for fd in grant.tap_fds] == [expect, expect]
        assert grant.reply["sndbuf"] == expect
    finally:
        grant.close()


def test_257_queues_are_refused_up_front(daemon: Daemon) -> None:
    assert "256" in refused(daemon, "invalid-value", br="br0", queues=257)
    assert "1..256" in refused(daemon, "invalid-value", br="br0", queues=0)


def test_qemu_mutual_exclusions_are_refused_with_qemus_words(daemon: Daemon) -> None:
    message = refused(daemon, "invalid-options", br="br0", fd="3", queues=2)
    assert message.endswith("are invalid with fd=")
    message = refused(daemon, "invalid-options", br="br0", vhostfds="3:4")
    assert message == "vhostfds= is invalid if fds= wasn't specified"


# -- vhost ---------------------------------------------------------------------
# The real device, its fds and a guest on them: tests/kernel/test_vhost.py.


def test_vhost_missing_warns_without_force_and_fails_with_it(
    ns: str, br0: str, tmp_path: Path
) -> None:
    absent = "/dev/vhost-net-absent-for-test"
    with run_daemon(ns, tmp_path, f'[vhost]\ndevice = "{absent}"\n') as daemon:
        grant = daemon.request(br=br0, vhost=True)
        try:
            assert grant.reply["vhostfds"] == 0 and grant.vhost_fds == []
            (warning,) = grant.reply["warnings"]
            assert "open vhost char device failed: No such file or directory" in warning
        finally:
            grant.close()
        message = refused(daemon, "vhost-unavailable", br=br0, vhost=True, vhostforce=True)
        assert "vhostforce" in message
        # vhostforce alone turns vhost on, as in QEMU
        refused(daemon, "vhost-unavailable", br=br0, vhostforce=True)


def test_the_real_default_vhost_device_path(daemon: Daemon) -> None:
    # These machines have no /dev/vhost-net: the absent path, for real.
    grant = daemon.request(br="br0", vhost=True)
    try:
        if os.path.exists("/dev/vhost-net"):
            assert grant.reply["vhostfds"] == 1
        else:
            assert grant.reply["vhostfds"] == 0
            assert "/dev/vhost-net" in grant.reply["warnings"][0]
    finally:
        grant.close()


# -- fd= and fds= ----------------------------------------------------------------


def test_fd_attaches_a_clients_own_tap(daemon: Daemon) -> None:
    fds = make_tap_in(daemon.ns, "own0")
    try:
        reply, back = daemon.call({"op": "request", "fd": str(fds[0]), "br": "br0"}, fds=fds)
        assert back == [] and reply["fds"] == 0 and reply["ifname"] == "own0"
        link = links(daemon.ns)["own0"]
        assert link["master"] == "br0" and "UP" in link["flags"] and link["mtu"] == 1400
    finally:
        tun.close_all(fds)
    wait_until(lambda: taps(daemon.ns) == [], what="own0 to vanish with its fd")


def test_fds_attach_every_queue_of_one_device(daemon: Daemon) -> None:
    fds = make_tap_in(daemon.ns, "own1", queues=3)
    try:
        names = ":".join(map(str, fds))
        reply, _ = daemon.call({"op": "request", "fds": names, "br": "br0"}, fds=fds)
        assert reply["ifname"] == "own1"
        assert links(daemon.ns)["own1"]["master"] == "br0"
    finally:
        tun.close_all(fds)


def test_fds_that_are_not_one_tap_are_refused(daemon: Daemon) -> None:
    a = make_tap_in(daemon.ns, "own2")
    b = make_tap_in(daemon.ns, "own3")
    r, w = os.pipe()
    try:
        with pytest.raises(client.ClientError) as exc:
            daemon.call({"op": "request", "fd": str(r), "br": "br0"}, fds=[r])
        assert exc.value.code == "not-a-tap"
        with pytest.raises(client.ClientError) as exc:
            daemon.call({"op": "request", "fds": "7:8", "br": "br0"}, fds=[a[0], b[0]])
        assert exc.value.code == "not-a-tap" and "own2" in exc.value.message
        with pytest.raises(client.ClientError) as exc:
            daemon.call({"op": "request", "fds": "7:8", "br": "br0"}, fds=[a[0]])
        assert exc.value.code == "invalid-value" and "2 tap fd" in exc.value.message
        for name in ("own2", "own3"):
            assert "master" not in links(daemon.ns)[name]
    finally:
        tun.close_all([*a, *b, r, w])


def test_a_tap_from_another_namespace_is_refused(daemon: Daemon) -> None:
    with netns() as other:
        fds = make_tap_in(other, "elsewhere0")
        try:
            with pytest.raises(client.ClientError) as exc:
                daemon.call({"op": "request", "fd": "3", "br": "br0"}, fds=fds)
            assert exc.value.code == "not-a-tap" and "namespace" in exc.value.message
        finally:
            tun.close_all(fds)


# -- helper= -------------------------------------------------------------------


@pytest.fixture
def bridge_conf() -> Iterator[None]:
    """qemu-bridge-helper's own ACL (compiled-in path): allow br0 only."""
    conf = Path("/etc/qemu/bridge.conf")
    saved = conf.read_bytes() if conf.exists() else None
    conf.parent.mkdir(exist_ok=True)
    conf.write_text("allow br0\n")
    yield
    if saved is None:
        conf.unlink()
    else:
        conf.write_bytes(saved)


def test_helper_runs_qemus_real_bridge_helper(
    ns: str, br0: str, tmp_path: Path, bridge_conf: None
) -> None:
    assert os.access(QEMU_BRIDGE_HELPER, os.X_OK), "installed with qemu-system-x86 by .ci/setup"
    ip("-n", ns, "link", "add", "br1", "type", "bridge")
    config = f'[programs]\nhelpers = {{ qbh = "{QEMU_BRIDGE_HELPER}" }}\n'
    with run_daemon(ns, tmp_path, config) as daemon:
        grant = daemon.request(helper="qbh", br=br0)
        try:
            assert len(grant.tap_fds) == 1
            info = tun.tap_info(grant.tap_fds[0])
            assert info.name == grant.ifname and info.vnet_hdr
            link = links(ns)[grant.ifname]
            assert link["master"] == "br0" and link["mtu"] == 1400
            assert str(link["linkinfo"]["info_data"]["user"]) in ("root", "0")
        finally:
            grant.close()
        # The helper's own ACL still applies, and its words reach the client.
        message = refused(daemon, "helper-failed", helper="qbh", br="br1")
        assert "failed with status" in message and "acl" in message.lower()
        refused(daemon, "denied", helper=QEMU_BRIDGE_HELPER, br=br0)
        refused(daemon, "denied", helper="nosuchhelper", br=br0)


# -- script= and downscript= ---------------------------------------------------


HOOK = """#!/bin/sh
printf '%s\\n' "$0 $1" >> {out}
env >> {out}.env
exit {status}
"""


def _hook(path: Path, out: Path, status: int = 0, sleep: float = 0) -> str:
    body = HOOK.format(out=out, status=status)
    if sleep:
        body = body.replace("exit", f"sleep {sleep}\nexit")
    path.write_text(body)
    path.chmod(0o755)
    return str(path)


def test_script_runs_with_the_ifname_and_a_clean_environment(
    ns: str, br0: str, tmp_path: Path
) -> None:
    out = tmp_path / "hook.out"
    up = _hook(tmp_path / "up.sh", out)
    fail = _hook(tmp_path / "fail.sh", out, status=3)
    config = f'[programs]\nhooks = {{ up = "{up}", fail = "{fail}" }}\n'
    with run_daemon(ns, tmp_path, config) as daemon:
        grant = daemon.request(br=br0, script="up", downscript="no")
        grant.close()
        assert out.read_text().split() == [up, grant.ifname]
        env = dict(
            line.split("=", 1)
            for line in (tmp_path / "hook.out.env").read_text().split("\n")
            if "=" in line
        )
        assert env.get("PATH") == "/usr/sbin:/usr/bin:/sbin:/bin"
        assert "TAPD_SOCKET" not in env and "HOME" not in env

        message = refused(daemon, "script-failed", br=br0, script="fail")
        assert message.startswith("network script fail failed with status 3")
        refused(daemon, "denied", br=br0, script=up)  # a path, not a name
        refused(daemon, "denied", br=br0, script="nosuch")
        refused(daemon, "denied", br=br0, script="up;reboot")


def test_downscript_runs_when_the_tap_could_not_be_delivered(
    ns: str, br0: str, tmp_path: Path
) -> None:
    out = tmp_path / "down.out"
    slow = _hook(tmp_path / "slow.sh", tmp_path / "slow.out", sleep=0.5)
    down = _hook(tmp_path / "down.sh", out)
    config = f'[programs]\nhooks = {{ slow = "{slow}", down = "{down}" }}\n'
    with run_daemon(ns, tmp_path, config) as daemon:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(daemon.socket_path)
        sock.sendall(
            protocol.encode({"op": "request", "br": br0, "script": "slow", "downscript": "down"})
        )
        sock.close()  # gone before the reply
        wait_until(out.exists, timeout=10, what="the downscript to run")
        (ifname,) = {line.split()[1] for line in out.read_text().splitlines()}
        assert ifname.startswith("tap")
        wait_until(lambda: taps(ns) == [], what="no tap left")
        assert daemon.call({"op": "hello"})[0]["ok"]
