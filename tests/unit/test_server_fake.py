"""The socket side without root: a real UNIX socket and real peer credentials,
tapd's real stack above the kernel, the fake kernel layer below it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from fakes import EventLog, FakeClosers, Programs, Stack, open_fds, stack

from tapd import aio, fdpass, scm
from tapd.config import Config
from tapd.server import Server


def config(programs: Programs, server: dict[str, Any] | None = None) -> Config:
    return Config.model_validate(
        {
            "server": server or {},
            "programs": {"nft": programs.nft, "hooks": {"down": programs.hook("down")}},
            "allow": [{"users": [str(os.getuid())], "bridges": ["*"]}],
        }
    )


def on_clock(programs: Programs, server: dict[str, Any]) -> Config:
    """For tests on the autojump clock: no subprocess (no nft), whose wait
    the clock would jump through."""
    cfg = config(programs, server)
    programs_ = cfg.programs.model_copy(update={"nft": str(programs.root / "no-nft")})
    return cfg.model_copy(update={"programs": programs_})


@pytest.fixture
def programs(tmp_path: Path) -> Programs:
    return Programs(tmp_path)


@dataclass
class Running:
    s: Stack
    server: Server
    closers: FakeClosers
    log: EventLog
    path: str


@contextlib.asynccontextmanager
async def serving(
    cfg: Config, tmp_path: Path, wrap: Callable[[socket.socket], Any] | None = None
) -> AsyncIterator[Running]:
    """tapd's stack above the fake kernel, serving on a socket in ``tmp_path``
    (``wrap`` may stand in front of the listening socket)."""
    path = str(tmp_path / "tapd.sock")
    real = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    real.bind(path)
    real.listen()
    closers = FakeClosers()
    try:
        async with stack(cfg) as s:
            server = Server(s.service, closers)  # type: ignore[arg-type]
            server.log = log = EventLog()
            async with trio.open_nursery() as nursery:
                listener = real if wrap is None else wrap(real)
                await nursery.start(server.serve, listener, nursery)
                yield Running(s, server, closers, log, path)
                nursery.cancel_scope.cancel()
    finally:
        real.close()


class Client:
    """A client on a real socket, one reply line at a time."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.sock.connect(path)
        self._buffer = b""

    async def send(self, data: bytes, fds: list[int] | None = None) -> None:
        await fdpass.send_line(self.sock, data, fds or [])

    async def reply(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            got = await fdpass.recv(self.sock)
            got.close_fds()
            if not got.data:
                raise EOFError(f"closed, after {self._buffer!r}")
            self._buffer += got.data
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        return {**reply, **reply.get("error", {})}  # (code and message at the top)

    async def closed(self) -> bool:
        return not self._buffer and not (await fdpass.recv(self.sock)).data

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


async def test_a_tap_over_the_socket(programs: Programs, tmp_path: Path) -> None:
    async with serving(config(programs), tmp_path) as r:
        hello = await aio.hello(path=r.path)
        assert hello["ok"] and "request" in hello["ops"]
        with await aio.request_tap(path=r.path, br="br0") as grant:
            (fd,) = grant.tap_fds
            link = r.s.kernel.by_fd(fd)
            assert link is not None and link.name == grant.ifname
            # tapd kept no copy: the client's is the only queue held.
            assert r.s.kernel.held(link) == 1
            leases = await aio.leases(path=r.path)
            assert [x["ifname"] for x in leases] == [grant.ifname]
        # The client closed its fd: the tap goes, and its lease with it.
        r.s.kernel.sweep()
        with trio.fail_after(5):
            while len(r.s.lifecycle.registry):
                await trio.sleep(0.005)
        assert r.s.service.connections == 0 and r.server.busy == 0
        (granted,) = r.log.named("request.granted")
        assert granted["uid"] == os.getuid() and granted["pid"] == os.getpid()


async def test_a_refusal_is_a_reply(programs: Programs, tmp_path: Path) -> None:
    async with serving(config(programs), tmp_path) as r:
        sock = Client(r.path)
        await sock.send(b'{"op": "request", "br": "nosuch"}\n{"op": "nope"}\n')
        first = await sock.reply()
        assert (first["ok"], first["code"]) == (False, "bridge-not-found")
        second = await sock.reply()
        assert second["code"] == "unknown-op"
        sock.sock.close()
        assert [x["code"] for x in r.log.named("request.refused")] == [
            "bridge-not-found",
            "unknown-op",
        ]


async def test_a_client_gone_before_its_reply_leaves_nothing(
    programs: Programs, tmp_path: Path
) -> None:
    async with serving(config(programs), tmp_path) as r:
        before = open_fds()
        hold = r.s.maker.hold("make")
        sock = Client(r.path)
        await sock.send(b'{"op": "request", "br": "br0", "downscript": "down"}\n')
        await hold.reached_by(1)
        sock.sock.close()  # gone while its tap is being made
        hold.release()
        with trio.fail_after(5):
            while not r.log.named("request.undelivered"):
                await trio.sleep(0.005)
            while not programs.ran():
                await trio.sleep(0.005)
        assert not r.s.kernel.taps() and len(r.s.lifecycle.registry) == 0
        assert [step for step, _ in r.s.maker.calls] == ["make"]
        assert len(r.s.netlink.called("delete")) == 1
        assert programs.ran()[0].startswith("down ")
        with trio.fail_after(5):
            while r.s.service.connections:
                await trio.sleep(0.005)
        assert open_fds() == before


async def test_a_pipelined_line_without_fds_leaves_the_next_one_its_fds(
    programs: Programs, tmp_path: Path
) -> None:
    """A client writes a line without fds and one with its own tap's fd before
    tapd reads: the kernel hands both over in one read, fd and all, and the fd
    is the second line's."""
    async with serving(config(programs), tmp_path) as r:
        mine = r.s.kernel.client_tap("vm0", owner=os.getuid())
        with Client(r.path) as sock:
            # Both sent before tapd runs again (no checkpoint between them).
            scm.send_line_sync(sock.sock, b'{"op": "hello"}\n', [])
            scm.send_line_sync(sock.sock, b'{"op": "request", "br": "br0", "fd": "3"}\n', [mine])
            assert (await sock.reply())["ok"]
            adopted = await sock.reply()
            assert adopted["ok"], adopted
            assert adopted["ifname"] == "vm0"
        link = r.s.kernel.by_name("vm0")
        assert link is not None and link.master is not None
        os.close(mine)


class Overloaded:
    """A listening socket whose accept() fails first with ``failures``."""

    def __init__(self, real: socket.socket, failures: list[int]) -> None:
        self.real = real
        self.failures = failures

    def setblocking(self, flag: bool) -> None:
        self.real.setblocking(flag)

    def fileno(self) -> int:
        return self.real.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            code = self.failures.pop(0)
            raise OSError(code, os.strerror(code))
        return self.real.accept()


async def test_accept_backs_off_when_short_of_fds(
    programs: Programs, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    failures = [errno.EMFILE, errno.ENFILE, errno.EMFILE, errno.ENOBUFS, errno.ENOMEM]
    started = trio.current_time()
    async with serving(
        on_clock(programs, {}), tmp_path, lambda real: Overloaded(real, failures)
    ) as r:
        sock = Client(r.path)
        await sock.send(b'{"op": "hello"}\n')
        assert (await sock.reply())["ok"]  # served once the host has fds again
        sock.sock.close()
        overloaded = r.log.named("server.accept.overloaded")
        assert [x["errno"] for x in overloaded] == [
            errno.EMFILE, errno.ENFILE, errno.EMFILE, errno.ENOBUFS, errno.ENOMEM,
        ]  # fmt: skip
        assert [x["retry_in"] for x in overloaded] == [0.01, 0.02, 0.04, 0.08, 0.16]
        assert trio.current_time() - started >= 0.31


async def test_accept_stops_on_a_broken_listener(
    programs: Programs, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with pytest.raises(BaseExceptionGroup) as raised:
        async with serving(
            on_clock(programs, {}), tmp_path, lambda real: Overloaded(real, [errno.EBADF])
        ):
            await trio.sleep_forever()
    assert raised.group_contains(OSError, match="Bad file descriptor")


async def test_request_timeout(
    programs: Programs, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(on_clock(programs, {"request_timeout": 7}), tmp_path) as r:
        sock = Client(r.path)
        started = trio.current_time()
        # A client trickling a line: the deadline covers the whole request.
        for byte in b'{"op": "hel':
            await sock.send(bytes([byte]))
            await trio.sleep(0.5)
        reply = await sock.reply()
        assert reply["code"] == "timeout" and "within 7 s" in reply["message"]
        assert trio.current_time() - started == pytest.approx(7)
        assert await sock.closed()
        sock.sock.close()
        assert r.log.named("connection.timeout")[0]["seconds"] == 7


async def test_connection_lifetime(
    programs: Programs, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cfg = on_clock(programs, {"request_timeout": 5, "connection_lifetime": 20})
    async with serving(cfg, tmp_path) as r:
        with Client(r.path) as sock:
            started = trio.current_time()
            answered = 0
            while True:
                with trio.move_on_after(3):
                    reply = await sock.reply()  # only the end comes unasked
                    break
                # A hello every 3 s: the connection is never idle for long.
                await sock.send(b'{"op": "hello"}\n')
                assert (await sock.reply())["ok"]
                answered += 1
        # Six answered (3 s .. 18 s); at 20 s the connection's time is up.
        assert reply["code"] == "timeout" and "connection_lifetime" in reply["message"]
        assert answered == 6 and trio.current_time() - started == pytest.approx(20)
        assert r.log.named("connection.timeout")[0]["lifetime"] == 20


async def test_connection_limits(programs: Programs, tmp_path: Path) -> None:
    cfg = config(programs, {"max_connections": 1, "root_reserved_connections": 0})
    async with serving(cfg, tmp_path) as r:
        first = Client(r.path)
        await first.send(b'{"op": "hello"}\n')
        assert (await first.reply())["ok"]
        second = Client(r.path)
        reply = await second.reply()
        assert reply["code"] == "overloaded"
        assert r.log.named("connection.overloaded")
        first.sock.close()
        second.sock.close()


async def test_a_uid_parking_fds_is_refused(programs: Programs, tmp_path: Path) -> None:
    async with serving(config(programs, {"max_fds_per_uid": 3}), tmp_path) as r:
        sock = Client(r.path)
        pipes = [os.pipe() for _ in range(2)]
        fds = [fd for pair in pipes for fd in pair]
        await sock.send(b'{"op": "hel', fds)  # 4 fds, no end of line
        reply = await sock.reply()
        assert reply["code"] == "too-many-fds" and "max_fds_per_uid" in reply["message"]
        for fd in fds:
            os.close(fd)
        sock.sock.close()
        with trio.fail_after(5):
            while r.s.service.connections:
                await trio.sleep(0.005)
        # tapd's copies went to the closers, and it counts none as held.
        assert r.closers.closed == 4 and r.server.client_fds.held == 0
