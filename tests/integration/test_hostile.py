"""Hostile clients against one running tapd.

Every attack here goes to the same daemon, and after each one it must still
answer, hold no more fds and leases than before, and have left no tap behind.
Only the server's own limits (request_timeout, max_connections) are tried on
daemons of their own, configured for them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from tapdtest import Daemon, ip, links, netns, open_fds, run_daemon, taps, wait_until

from tapd import client, fdpass, protocol

HELLO = b'{"op": "hello"}\n'


class Target:
    """The one daemon every attack in this module goes to, and its fd count
    once warm (its netlink socket and worker thread are made lazily)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.baseline = daemon.warm_fds()
        self.baseline_fds = self.fds()

    def fds(self) -> dict[str, str]:
        """What each of the daemon's fds is, for a message when one leaks."""
        where = f"/proc/{self.daemon.proc.pid}/fd"
        out = {}
        for fd in os.listdir(where):
            with contextlib.suppress(OSError):
                out[fd] = os.readlink(f"{where}/{fd}")
        return out

    def intact(self) -> None:
        """Still serving, no tap left, and every fd an attack cost it closed again."""
        daemon = self.daemon
        assert daemon.proc.poll() is None, "tapd died"
        assert daemon.call({"op": "hello"})[0]["ok"] is True
        wait_until(lambda: taps(daemon.ns) == [], what="no tap left")
        wait_until(lambda: daemon.leases() == [], what=f"no lease left: {daemon.leases()}")
        try:
            wait_until(lambda: daemon.pid_fds() == self.baseline, what="tapd's fds")
        except AssertionError:
            now = self.fds()
            extra = {fd: what for fd, what in now.items() if self.baseline_fds.get(fd) != what}
            message = f"tapd holds {len(now)} fds, not {self.baseline}: {extra}"
            raise AssertionError(message) from None


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with netns() as ns:
        ip("-n", ns, "link", "add", "br0", "type", "bridge")
        ip("-n", ns, "link", "set", "br0", "up")
        with run_daemon(ns, tmp_path_factory.mktemp("hostile")) as daemon:
            yield Target(daemon)


@pytest.fixture
def daemon(target: Target) -> Iterator[Daemon]:
    yield target.daemon
    target.intact()


def connect(daemon: Daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(daemon.socket_path)
    return sock


def read_replies(sock: socket.socket) -> list[dict[str, Any]]:
    """Every reply line until the daemon closes the connection."""
    buf = b""
    while True:
        try:
            got = fdpass.recv_sync(sock)
        except ConnectionResetError:
            break
        got.close_fds()
        if not got.data:
            break
        buf += got.data
    return [protocol.decode_reply(line) for line in buf.splitlines()]


# -- bytes that are not a request -----------------------------------------------------


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json}", "malformed-json"),
        (b"", "malformed-json"),
        (b"{", "malformed-json"),
        (b'{"op": "hello"} {"op": "hello"}', "malformed-json"),
        (b'{"op": NaN}', "malformed-json"),
        (b'{"op": "hello", "op": "request"}', "malformed-json"),
        (b"[" * 60_000, "malformed-json"),  # nested too deep, under 64 KiB
        (b"[1, 2]", "not-an-object"),
        (b"null", "not-an-object"),
        (b'"request"', "not-an-object"),
        (b"{}", "missing-op"),
        (b'{"op": "reboot"}', "unknown-op"),
        (b'{"op": 1}', "unknown-op"),
        (b'{"op": ["request"]}', "unknown-op"),
        (b'{"op": "hello", "verbose": true}', "unknown-key"),
        (b'{"op": "request", "br": "br0", "__class__": "x"}', "unknown-key"),
        (b'{"op": "request", "br": "br0", "queues": "2"}', "invalid-value"),
        (b'{"op": "request", "br": "br0", "queues": 2.0}', "invalid-value"),
        (b'{"op": "request", "br": "br0", "queues": -1}', "invalid-value"),
        (b'{"op": "request", "br": "br0", "queues": 18446744073709551617}', "invalid-value"),
        (b'{"op": "request", "br": "br0", "vnet_hdr": "yes"}', "invalid-value"),
        (b'{"op": "request", "br": ["br0"]}', "invalid-value"),
        (b'{"op": "request", "br": {"name": "br0"}}', "invalid-value"),
        (b'{"op": "request", "br": null}', "invalid-value"),
        (b'{"op": "release", "lease": 7}', "invalid-value"),
        (b'{"op": "release", "lease": ""}', "invalid-value"),
        # NUL bytes: raw, escaped into names, alone on a line
        (b"\x00\x00\x00\x00", "malformed-json"),
        (b'{"op": "hel\x00lo"}', "malformed-json"),
        (b'{"op": "request", "br": "br\\u0000"}', "invalid-value"),
        (b'{"op": "request", "br": "br0", "ifname": "tap\\u00000"}', "invalid-ifname"),
        # not UTF-8: a stray byte, an overlong '/', a lone surrogate
        (b'{"op": "\xff\xfe"}', "malformed-json"),
        (b'{"op": "request", "br": "br0", "ifname": "\xc0\xaf"}', "malformed-json"),
        (b'{"op": "request", "br": "br0", "ifname": "\xed\xa0\x80"}', "malformed-json"),
        (b'{"op": "request", "br": "br0", "ifname": "\\ud800"}', "malformed-json"),
        # names that are paths
        (b'{"op": "request", "br": "br0", "ifname": "../../etc"}', "invalid-ifname"),
        (b'{"op": "request", "br": "br0", "ifname": ".."}', "invalid-ifname"),
        (b'{"op": "request", "br": "br0", "ifname": "a/b"}', "invalid-ifname"),
        (b'{"op": "request", "br": "../../etc"}', "invalid-value"),
        (b'{"op": "bridge-helper", "br": "../br0"}', "invalid-value"),
        (b'{"op": "release", "lease": "../../etc/passwd"}', "lease-not-found"),
        # programs the client picks itself: only names the admin listed are run
        (b'{"op": "request", "br": "br0", "script": "/bin/sh"}', "denied"),
        (b'{"op": "request", "br": "br0", "script": "../x"}', "denied"),
        (b'{"op": "request", "br": "br0", "script": "x; reboot"}', "denied"),
        (b'{"op": "request", "br": "br0", "script": "sh"}', "denied"),
        (b'{"op": "request", "br": "br0", "downscript": "/bin/sh"}', "denied"),
        (b'{"op": "request", "br": "br0", "downscript": "../x"}', "denied"),
        (b'{"op": "request", "br": "br0", "helper": "/bin/sh"}', "denied"),
        (b'{"op": "request", "br": "br0", "helper": "../x"}', "denied"),
        (b'{"op": "request", "br": "br0", "helper": "/usr/lib/qemu/qemu-bridge-helper"}', "denied"),
        (b'{"op": "request", "br": "br0", "helper": ""}', "denied"),
        # the prepare op (a persistent tap opened by name) takes the same blows
        (b'{"op": "prepare"}', "invalid-value"),
        (b'{"op": "prepare", "br": "br0", "queues": "2"}', "invalid-value"),
        (b'{"op": "prepare", "br": "br0", "ifname": "../../etc"}', "invalid-ifname"),
        (b'{"op": "prepare", "br": "br0", "ifname": "-x"}', "invalid-ifname"),
        (b'{"op": "prepare", "br": "br0", "script": "/bin/sh"}', "denied"),
        (b'{"op": "prepare", "br": "br0", "fd": "3"}', "option-not-applicable"),
        (b'{"op": "prepare", "br": "br0", "helper": "../x"}', "option-not-applicable"),
        (b'{"op": "prepare", "br": "br0", "guest_mac": "ff:ff:ff:ff:ff:ff"}', "invalid-value"),
        (b'{"op": "prepare", "br": "br0", "__class__": "x"}', "unknown-key"),
    ],
    ids=lambda value: repr(value)[:48] if isinstance(value, bytes) else None,
)
def test_a_bad_line_gets_its_error_and_the_connection_goes_on(
    daemon: Daemon, line: bytes, code: str
) -> None:
    replies = daemon.raw(line + b"\n" + HELLO)
    assert [r["ok"] for r in replies] == [False, True], replies
    assert replies[0]["error"]["code"] == code, replies[0]
    assert replies[1]["protocol"] == 1


def test_a_one_mib_line_is_refused_and_the_connection_closed(daemon: Daemon) -> None:
    replies = daemon.raw(b'{"op": "hello", "pad": "' + b"x" * (1 << 20) + b'"}\n' + HELLO)
    assert [r["error"]["code"] for r in replies] == ["line-too-long"]


def test_a_mib_without_any_newline_is_refused_too(daemon: Daemon) -> None:
    replies = daemon.raw(b"x" * (1 << 20))
    assert [r["error"]["code"] for r in replies] == ["line-too-long"]


# -- fds nobody asked for ------------------------------------------------------------


def test_250_stray_fds_on_a_hello_are_closed(daemon: Daemon) -> None:
    r, w = os.pipe()
    try:
        replies = daemon.raw(HELLO, fds=[r] * 250)
    finally:
        os.close(r)
        os.close(w)
    assert [reply["ok"] for reply in replies] == [True]


def test_over_512_fds_gathered_before_a_newline_are_refused(daemon: Daemon) -> None:
    r, w = os.pipe()
    try:
        with connect(daemon) as sock:
            # Three messages of 200 fds, each with a piece of one unfinished line.
            for piece in (b'{"op"', b': "he', b"llo"):
                fdpass.send_line_sync(sock, piece, [r] * 200)
            replies = read_replies(sock)
    finally:
        os.close(r)
        os.close(w)
    assert [reply["error"]["code"] for reply in replies] == ["too-many-fds"]
    assert "512" in replies[0]["error"]["message"]


def test_fds_sent_with_every_line_of_a_long_connection_are_closed(daemon: Daemon) -> None:
    r, w = os.pipe()
    try:
        with connect(daemon) as sock:
            for _ in range(50):
                fdpass.send_line_sync(sock, HELLO, [r, w] * 100)
            sock.shutdown(socket.SHUT_WR)
            replies = read_replies(sock)
    finally:
        os.close(r)
        os.close(w)
    assert [reply["ok"] for reply in replies] == [True] * 50


# -- clients that go away, or never say anything -----------------------------------------


def test_hundreds_of_clients_vanishing_mid_request_leave_nothing(daemon: Daemon) -> None:
    line = protocol.encode({"op": "request", "br": "br0", "queues": 8})

    def vanish(_: int) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(daemon.socket_path)
            sock.sendall(line)

    # Every tap made for a vanished client goes with its undelivered fds.  A
    # real client asking beside them is served, and its leases end with its taps.
    with ThreadPoolExecutor(16) as pool:
        storm = pool.map(vanish, range(300))
        for _ in range(5):
            daemon.request(br="br0").close()
        list(storm)
    wait_until(lambda: taps(daemon.ns) == [], timeout=30, what="the storm's taps to go")


def test_hundreds_of_prepare_requesters_vanishing_leave_no_persistent_tap(
    daemon: Daemon,
) -> None:
    # A prepared tap is persistent and tapd keeps no queue of it: only the
    # owner rule (its requester gone, nobody holding it) removes it.
    line = protocol.encode({"op": "prepare", "br": "br0"})

    def vanish(_: int) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(daemon.socket_path)
            sock.sendall(line)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(vanish, range(100)))
    wait_until(lambda: taps(daemon.ns) == [], timeout=30, what="the prepared taps to go")
    wait_until(lambda: daemon.leases() == [], timeout=10, what="their leases to end")


def test_hundreds_of_idle_connections_do_not_delay_a_real_request(daemon: Daemon) -> None:
    idle = [connect(daemon) for _ in range(300)]
    try:
        wait_until(
            lambda: daemon.call({"op": "status"})[0]["connections"] == 301,
            what="every idle connection to be accepted",
        )
        start = time.monotonic()
        grant = daemon.request(br="br0", queues=4)
        took = time.monotonic() - start
        grant.close()
        assert took < 1.0, f"a request beside 300 idle connections took {took:.2f}s"
    finally:
        for sock in idle:
            sock.close()
    wait_until(
        lambda: daemon.call({"op": "status"})[0]["connections"] == 1,
        what="the idle connections to be gone",
    )


def test_forty_clients_racing_for_one_ifname_one_wins(daemon: Daemon) -> None:
    ours = open_fds()
    start = threading.Barrier(40)

    def race(_: int) -> client.TapGrant | str:
        start.wait()
        try:
            return daemon.request(br="br0", ifname="race0")
        except client.ClientError as exc:
            return exc.code

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(race, range(40)))
    winners = [r for r in results if isinstance(r, client.TapGrant)]
    try:
        assert len(winners) == 1, results
        assert sorted(r for r in results if isinstance(r, str)) == ["ifname-taken"] * 39
        assert taps(daemon.ns) == ["race0"]
        assert links(daemon.ns)["race0"]["master"] == "br0"
    finally:
        for grant in winners:
            grant.close()
    assert open_fds() == ours  # no loser was handed an fd either


def test_a_bridge_at_its_port_limit(daemon: Daemon) -> None:
    # net/bridge/br_if.c: 1023 ports fill a bridge.  Fill a bridge of its own
    # with persistent taps in one group, so that one message removes them all.
    ns = daemon.ns
    batch = "link add brfull type bridge\nlink set brfull up\n" + "".join(
        f"tuntap add dev p{i} mode tap\nlink set p{i} master brfull group 99\n" for i in range(1023)
    )
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch, text=True, check=True)
    try:
        before = set(links(ns))
        for options in ({}, {"queues": 8}, {"ifname": "full0"}):
            with pytest.raises(client.ClientError) as exc:
                daemon.request(br="brfull", **options)
            assert exc.value.code == "bridge-full", exc.value
            assert "1023" in exc.value.message
        assert set(links(ns)) == before
        assert daemon.leases() == []
        # A bridge with room is still served beside the full one.
        daemon.request(br="br0").close()
    finally:
        ip("-n", ns, "link", "del", "group", "99")
        ip("-n", ns, "link", "del", "brfull")


# -- limits of the server itself ---------------------------------------------------------


@pytest.fixture
def ns_br0() -> Iterator[str]:
    with netns() as ns:
        ip("-n", ns, "link", "add", "br0", "type", "bridge")
        ip("-n", ns, "link", "set", "br0", "up")
        yield ns


def test_a_half_sent_line_times_out(ns_br0: str, tmp_path: Path) -> None:
    with run_daemon(ns_br0, tmp_path, "[server]\nrequest_timeout = 1\n") as d:
        with connect(d) as sock:
            start = time.monotonic()
            sock.sendall(b'{"op": "hel')
            replies = read_replies(sock)
            took = time.monotonic() - start
        assert [r["error"]["code"] for r in replies] == ["timeout"]
        assert 0.9 < took < 5, took
        # A client trickling one byte at a time cannot stretch the deadline.
        with connect(d) as sock:
            start = time.monotonic()
            with pytest.raises(OSError):
                for byte in b'{"op": "hello"' * 10:
                    sock.send(bytes([byte]))
                    time.sleep(0.05)
            took = time.monotonic() - start
        assert took < 3, took
        assert d.call({"op": "hello"})[0]["ok"] is True


def test_a_client_that_never_reads_its_replies_is_let_go(ns_br0: str, tmp_path: Path) -> None:
    # Requests piled up without reading a reply: tapd's replies fill the
    # socket and its send waits.  That wait must end too, or any client that
    # can connect holds a connection slot for ever.
    with (
        run_daemon(ns_br0, tmp_path, "[server]\nrequest_timeout = 1\n") as d,
        connect(d) as sock,
    ):
        sock.setblocking(False)
        stuck = time.monotonic() + 5
        while time.monotonic() < stuck:
            try:
                sock.send(HELLO * 64)
            except BlockingIOError:
                break  # tapd no longer reads: it is waiting to send
            except OSError:
                break  # tapd already closed the connection
        else:
            pytest.fail("tapd kept reading without anyone reading its replies")
        wait_until(
            lambda: d.call({"op": "status"})[0]["connections"] == 1,
            timeout=5,
            what="tapd to drop the connection that does not read",
        )


def test_max_connections_turns_away_one_more(ns_br0: str, tmp_path: Path) -> None:
    # These clients are root's: without its reserve, root is turned away like anyone.
    config = "[server]\nmax_connections = 5\nroot_reserved_connections = 0\n"
    with run_daemon(ns_br0, tmp_path, config) as d:
        held = [connect(d) for _ in range(5)]
        try:
            for sock in held:  # admitted: each is answered
                sock.sendall(HELLO)
                assert protocol.decode_reply(sock.recv(4096))["ok"] is True
            with connect(d) as extra:
                replies = read_replies(extra)
            assert [r["error"]["code"] for r in replies] == ["overloaded"]
            # tapd's refusal may overtake the request: the client library's
            # send then fails (EPIPE) before it reads tapd's "overloaded".
            with pytest.raises((client.ClientError, BrokenPipeError)) as exc:
                d.request(br="br0")
            assert isinstance(exc.value, BrokenPipeError) or exc.value.code == "overloaded"
            for sock in held:  # the five still work
                sock.sendall(b'{"op": "request", "br": "br0"}\n')
                got = fdpass.recv_sync(sock)
                assert protocol.decode_reply(got.data)["ok"] is True and len(got.fds) == 1
                got.close_fds()
        finally:
            held.pop().close()
        # One slot free again: a new client is served.
        wait_until(lambda: _hello_ok(d), what="a freed slot to be usable")
        for sock in held:
            sock.close()
        wait_until(lambda: taps(ns_br0) == [], what="no tap left")


def _hello_ok(d: Daemon) -> bool:
    try:
        return d.call({"op": "hello"})[0]["ok"] is True
    except client.ClientError as exc:
        assert exc.code == "overloaded"
        return False
