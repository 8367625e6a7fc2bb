"""A real tapd in a network namespace of the test's own, against the real kernel."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import threading

import pytest
from tapdtest import Daemon, ip, links, open_fds, taps, wait_until

from tapd import client, fdpass, protocol, tun


def test_granted_fd_is_a_tap_on_the_bridge(daemon: Daemon) -> None:
    grant = daemon.request(br="br0")
    try:
        (fd,) = grant.tap_fds
        info = tun.tap_info(fd)
        assert info.name == grant.ifname
        assert info.flags & (tun.IFF_TAP | tun.IFF_NO_PI) == tun.IFF_TAP | tun.IFF_NO_PI
        assert info.vnet_hdr and grant.reply["vnet_hdr"] is True
        assert tun.get_vnet_hdr_len(fd) == tun.VIRTIO_NET_HDR_LEN

        link = links(daemon.ns)[grant.ifname]
        assert link["master"] == "br0"
        assert "UP" in link["flags"]
        assert link["mtu"] == 1400 == grant.reply["mtu"]
        assert link["address"] == grant.reply["mac"]
        assert link["address"].startswith("fe:")
        data = link["linkinfo"]["info_data"]
        assert data["type"] == "tap" and data["persist"] is False
        assert data["user"] == "root" or str(data["user"]) == "0"
    finally:
        grant.close()


def test_tap_disappears_when_the_vm_closes_its_fd(daemon: Daemon) -> None:
    grant = daemon.request(br="br0")
    name = grant.ifname
    assert name in taps(daemon.ns)
    grant.close()
    wait_until(lambda: name not in links(daemon.ns), what=f"{name} to vanish")


def test_default_names_come_from_the_template_and_differ(daemon: Daemon) -> None:
    grants = [daemon.request(br="br0") for _ in range(5)]
    try:
        names = [g.ifname for g in grants]
        assert len(set(names)) == 5
        for name in names:
            assert name.startswith("tap") and len(name) == 11
            int(name[3:], 16)
    finally:
        for g in grants:
            g.close()


def test_named_tap_and_a_taken_name(daemon: Daemon) -> None:
    grant = daemon.request(br="br0", ifname="vm0-net0")
    try:
        assert grant.ifname == "vm0-net0"
        assert tun.tap_info(grant.tap_fds[0]).name == "vm0-net0"
        # A live tap of that name is never attached to by name...
        with pytest.raises(client.ClientError) as exc:
            daemon.request(br="br0", ifname="vm0-net0")
        assert exc.value.code == "ifname-taken"
        # ...and neither is any other existing interface.
        with pytest.raises(client.ClientError) as exc:
            daemon.request(br="br0", ifname="br0")
        assert exc.value.code == "ifname-taken"
        assert "'br0'" in exc.value.message
    finally:
        grant.close()
    # tapd lets go of its copies just after sending them, so the tap may
    # outlive the client's close by a moment, but no longer.
    wait_until(lambda: taps(daemon.ns) == [], what="the closed tap to disappear")


def test_multiqueue_fds_are_queues_of_one_device(daemon: Daemon) -> None:
    grant = daemon.request(br="br0", queues=4)
    try:
        assert len(grant.tap_fds) == 4 == grant.reply["fds"]
        assert {tun.tap_info(fd).name for fd in grant.tap_fds} == {grant.ifname}
        data = links(daemon.ns)[grant.ifname]["linkinfo"]["info_data"]
        assert data["multi_queue"] is True and data["numqueues"] == 4
    finally:
        grant.close()


@pytest.mark.parametrize(
    ("request_", "code", "mentions"),
    [
        ({"op": "request", "br": "nosuchbr"}, "bridge-not-found", "nosuchbr"),
        ({"op": "request", "br": "lo"}, "not-a-bridge", "lo"),
        ({"op": "request", "br": "br0", "ifname": "a" * 16}, "invalid-ifname", "15"),
        ({"op": "request", "br": "br0", "ifname": "../x"}, "invalid-ifname", "../x"),
        ({"op": "request", "br": "br0", "ifname": "tap%d"}, "invalid-ifname", "tap%d"),
        ({"op": "request"}, "invalid-value", "br"),
        ({"op": "request", "br": "br0", "queues": "2"}, "invalid-value", "queues"),
        ({"op": "request", "br": "br0", "queues": 257}, "invalid-value", "256"),
        ({"op": "request", "br": "br0", "color": "red"}, "unknown-key", "color"),
        ({"op": "reqest", "br": "br0"}, "unknown-op", "reqest"),
        ({"br": "br0"}, "missing-op", "op"),
    ],
)
def test_refusals_leave_nothing_behind(
    daemon: Daemon, request_: dict[str, object], code: str, mentions: str
) -> None:
    with pytest.raises(client.ClientError) as exc:
        daemon.call(request_)
    assert exc.value.code == code
    assert mentions in exc.value.message
    assert taps(daemon.ns) == []


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json}\n", "malformed-json"),
        (b"[1, 2]\n", "not-an-object"),
        (b'"hello"\n', "not-an-object"),
        (b'{"op": "hello", "op": "request"}\n', "malformed-json"),
        (b'{"op": "req\xffuest"}\n', "malformed-json"),
        (b'{"op": "request", "br": "br\\u0000"}\n', "invalid-value"),
    ],
)
def test_malformed_lines_get_an_error_and_the_connection_goes_on(
    daemon: Daemon, line: bytes, code: str
) -> None:
    replies = daemon.raw(line + b'{"op": "hello"}\n')
    assert [r["ok"] for r in replies] == [False, True]
    assert replies[0]["error"]["code"] == code
    assert replies[1]["protocol"] == 1


def test_an_over_long_line_is_refused_and_the_connection_closed(daemon: Daemon) -> None:
    replies = daemon.raw(b'{"op": "hello", "pad": "' + b"x" * (1 << 20) + b'"}\n')
    assert len(replies) == 1
    assert replies[0]["error"]["code"] == "line-too-long"
    assert daemon.call({"op": "hello"})[0]["ok"] is True


def test_stray_fds_from_a_client_are_closed(daemon: Daemon) -> None:
    before = daemon.warm_fds()
    r, w = os.pipe()
    try:
        replies = daemon.raw(b'{"op": "hello"}\n', fds=[r] * 100)
    finally:
        os.close(r)
        os.close(w)
    assert replies[0]["ok"] is True
    wait_until(lambda: daemon.pid_fds() == before, what="daemon fds back to baseline")


def test_a_client_that_vanishes_mid_request_leaves_nothing(daemon: Daemon) -> None:
    before = daemon.warm_fds()
    line = protocol.encode({"op": "request", "br": "br0", "queues": 8})
    for _ in range(30):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(daemon.socket_path)
        sock.sendall(line)
        sock.close()
    # The daemon still answers, and nothing it made survives.
    assert daemon.call({"op": "hello"})[0]["ok"] is True
    wait_until(lambda: taps(daemon.ns) == [], what="no taps left")
    wait_until(lambda: daemon.pid_fds() == before, what="daemon fds back to baseline")


def test_clients_in_parallel_each_get_their_own_tap(daemon: Daemon) -> None:
    grants: list[client.TapGrant] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            g = daemon.request(br="br0", queues=2)
            with lock:
                grants.append(g)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert len({g.ifname for g in grants}) == 20
        assert sorted(taps(daemon.ns)) == sorted(g.ifname for g in grants)
    finally:
        for g in grants:
            g.close()


def test_a_full_bridge_is_reported_and_nothing_is_left(daemon: Daemon) -> None:
    # net/bridge/br_if.c: port numbers come from a BR_MAX_PORTS (1024) bitmap
    # whose bit 0 is reserved, so 1023 ports fill a bridge.  Fill br0 with
    # persistent taps made by iproute2 in one batch.
    ns = daemon.ns
    batch = "".join(
        f"tuntap add dev p{i} mode tap\nlink set p{i} master br0\n" for i in range(1023)
    )
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch, text=True, check=True)
    before = set(links(ns))
    with pytest.raises(client.ClientError) as exc:
        daemon.request(br="br0")
    assert exc.value.code == "bridge-full"
    assert "1023" in exc.value.message
    assert set(links(ns)) == before
    assert daemon.call({"op": "hello"})[0]["ok"] is True


def test_hello_names_the_protocol_and_version(daemon: Daemon) -> None:
    reply, fds = daemon.call({"op": "hello"})
    assert fds == []
    assert reply["protocol"] == 1
    assert reply["version"] == __import__("tapd").__version__
    assert set(reply["ops"]) >= {"hello", "request"}


def test_every_decision_is_one_json_log_event(daemon: Daemon) -> None:
    grant = daemon.request(br="br0")
    grant.close()
    with pytest.raises(client.ClientError):
        daemon.request(br="nosuchbr")
    daemon.stop()
    events = daemon.log()
    granted = [e for e in events if e["event"] == "request.granted"]
    refused = [e for e in events if e["event"] == "request.refused"]
    assert len(granted) == 1 and len(refused) == 1
    for event in (granted[0], refused[0]):
        assert event["uid"] == 0 and event["pid"] > 0 and "request" in event
    assert granted[0]["ifname"] == grant.ifname and granted[0]["outcome"] == "granted"
    assert refused[0]["code"] == "bridge-not-found"
    assert json.dumps(events)  # every line was one JSON object


def test_fds_beyond_one_message_arrive_in_order(daemon: Daemon) -> None:
    before = open_fds()
    grant = daemon.request(br="br0", queues=256)
    try:
        assert len(grant.tap_fds) == 256 > fdpass.MAX_FDS_PER_MSG
        assert {tun.tap_info(fd).name for fd in grant.tap_fds} == {grant.ifname}
        data = links(daemon.ns)[grant.ifname]["linkinfo"]["info_data"]
        assert data["numqueues"] == 256
    finally:
        grant.close()
    assert open_fds() == before


def test_more_leases_than_select_or_the_default_fd_limit_allow(daemon: Daemon) -> None:
    # Each lease holds a pidfd for its owner: past ~1000 leases tapd's fd
    # numbers pass select()'s 1024 and the usual soft RLIMIT_NOFILE.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    ip("-n", daemon.ns, "link", "add", "br1", "type", "bridge")
    grants: list[client.TapGrant] = []
    try:
        for i in range(1100):
            grants.append(daemon.request(br="br0" if i % 2 else "br1"))
        assert len(daemon.leases()) == 1100
        assert client.status(path=daemon.socket_path)["leases"] == 1100
        assert daemon.call({"op": "hello"})[0]["ok"] is True
    finally:
        # Tear the namespace down first: the kernel then removes every tap in
        # one batch, where closing 1100 fds one by one costs 30 ms each.
        daemon.stop()
        ip("netns", "delete", daemon.ns, check=False)
        for g in grants:
            g.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
