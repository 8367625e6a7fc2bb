"""tapd.aio on both loops against a fake tapd (no root): errors as the sync
client's, timeouts through the loop, and a loop that keeps running while a
call waits.  The real daemon: tests/integration/test_aio_client.py."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from faketapd import FakeTapd, fake_tapd

from tapd import aio, client


def open_fds(fake: FakeTapd | None = None) -> int:
    """This process's open fds, less the fake's end of each call it holds."""
    held = len(fake.requests) if fake is not None else 0
    return len(os.listdir("/proc/self/fd")) - held


@pytest.fixture
def silent() -> Iterator[FakeTapd]:
    """A tapd that takes every request and never answers."""
    with fake_tapd(request=None, status=None) as fake:
        yield fake


def on_asyncio(make: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        return await make()

    return asyncio.run(main())


def test_asyncio_gets_what_the_sync_client_gets() -> None:
    with fake_tapd() as fake:
        sync = client.request_tap(path=fake.path, br="br0")
        grant = on_asyncio(lambda: aio.request_tap(path=fake.path, br="br0"))
        assert fake.requests[-1] == {"op": "request", "br": "br0"} == fake.requests[-2]
        assert on_asyncio(lambda: aio.leases(path=fake.path)) == client.leases(path=fake.path)
        assert on_asyncio(lambda: aio.status(path=fake.path)) == client.status(path=fake.path)
    assert grant.reply == sync.reply
    assert len(grant.tap_fds) == len(sync.tap_fds) == 1
    grant.close()
    sync.close()


async def test_trio_gets_what_the_sync_client_gets() -> None:
    with fake_tapd() as fake:
        grant = await aio.request_tap(path=fake.path, br="br0")
        with grant:
            assert grant.reply == client.request_tap(path=fake.path, br="br0").reply
        assert await aio.hello(path=fake.path) == client.hello(path=fake.path)
        assert await aio.release("x", path=fake.path) == client.release("x", path=fake.path)


REFUSAL = {"ok": False, "error": {"code": "bridge-not-found", "message": "no br9"}}


def test_asyncio_errors_are_the_sync_clients(tmp_path: Path) -> None:
    with fake_tapd(request=REFUSAL) as fake:
        with pytest.raises(client.DaemonError) as sync:
            client.request_tap(path=fake.path, br="br9")
        with pytest.raises(client.DaemonError) as caught:
            on_asyncio(lambda: aio.request_tap(path=fake.path, br="br9"))
    assert (caught.value.code, caught.value.message) == (sync.value.code, sync.value.message)
    with pytest.raises(client.Unreachable):
        on_asyncio(lambda: aio.status(path=str(tmp_path / "none")))


async def test_trio_errors_are_the_sync_clients(tmp_path: Path) -> None:
    with fake_tapd(request=REFUSAL) as fake, pytest.raises(client.DaemonError) as caught:
        await aio.request_tap(path=fake.path, br="br9")
    assert caught.value.code == "bridge-not-found"
    with pytest.raises(client.Unreachable):
        await aio.status(path=str(tmp_path / "none"))


def test_asyncio_timeout_is_the_clients(silent: FakeTapd) -> None:
    before = open_fds(silent)
    with pytest.raises(client.Timeout) as caught:
        on_asyncio(lambda: aio.status(path=silent.path, timeout=0.2))
    assert caught.value.code == "client-timeout"
    assert open_fds(silent) == before


async def test_trio_timeout_is_the_clients(silent: FakeTapd) -> None:
    before = open_fds(silent)
    with pytest.raises(client.Timeout):
        await aio.status(path=silent.path, timeout=0.2)
    assert open_fds(silent) == before


async def _until_asked(fake: FakeTapd, sleep: Callable[[float], Awaitable[Any]]) -> None:
    while not fake.requests:
        await sleep(0.01)


def test_asyncio_loop_runs_while_a_call_waits(silent: FakeTapd) -> None:
    """Another task sees the request reach tapd and cancels the call; a call
    that blocked the loop would instead end 30 s later in a timeout."""

    async def main() -> None:
        call = asyncio.ensure_future(aio.request_tap(path=silent.path, br="br0", timeout=30))
        await _until_asked(silent, asyncio.sleep)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    before = open_fds(silent)
    asyncio.run(main())
    assert open_fds(silent) == before


async def test_trio_loop_runs_while_a_call_waits(silent: FakeTapd) -> None:
    before = open_fds(silent)
    async with trio.open_nursery() as nursery:

        async def call() -> None:
            await aio.request_tap(path=silent.path, br="br0", timeout=30)
            raise AssertionError("a silent tapd answered")

        nursery.start_soon(call)
        await _until_asked(silent, trio.sleep)
        nursery.cancel_scope.cancel()
    assert nursery.cancel_scope.cancelled_caught
    assert open_fds(silent) == before


def test_outside_a_loop_it_says_which_client_to_use() -> None:
    coro = aio.status(path="/nonexistent")
    with pytest.raises(RuntimeError, match=r"tapd\.client is the sync one"):
        coro.send(None)
    coro.close()


def test_asyncio_waits_out_a_full_backlog(monkeypatch: pytest.MonkeyPatch) -> None:
    """A UNIX connect to a listener whose queue is full says EAGAIN and gives
    nothing to wait on: the call backs off and tries again until tapd takes
    it (here: once the queue is emptied), within its timeout."""
    backing_off = []

    async def spy(self: Any, seconds: float) -> None:
        backing_off.append(seconds)
        await asyncio.sleep(seconds)

    monkeypatch.setattr(aio._Asyncio, "sleep", spy)
    path = tempfile.mkdtemp(prefix="tapd-") + "/s"  # sun_path: tmp_path can be too long
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued = []
    while True:  # fill the listener's queue
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        filler.setblocking(False)
        try:
            filler.connect(path)
        except BlockingIOError:
            filler.close()
            break
        queued.append(filler)

    async def main() -> dict[str, Any]:
        call = asyncio.ensure_future(aio.hello(path=path, timeout=30))
        while not backing_off and not call.done():
            await asyncio.sleep(0.005)
        if call.done():  # it gave up at once
            return await call
        for _ in queued:
            listener.accept()[0].close()
        listener.setblocking(False)
        conn, _ = await asyncio.get_running_loop().sock_accept(listener)
        with conn:
            assert await asyncio.get_running_loop().sock_recv(conn, 100) == b'{"op":"hello"}\n'
            conn.sendall(b'{"ok":true,"protocol":1}\n')
            return await call

    try:
        assert asyncio.run(main()) == {"ok": True, "protocol": 1}
    finally:
        for filler in queued:
            filler.close()
        listener.close()
        os.unlink(path)
    assert backing_off[0] == aio._CONNECT_BACKOFF[0]
