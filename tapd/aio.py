"""tapd's client for programs that live in an event loop: asyncio or trio.

The calls of :mod:`tapd.client`, awaitable, with the same arguments, results
and errors, on the same sans-IO core (:mod:`tapd.exchange`), so the two cannot
differ in what they send or accept:

    grant = await tapd.aio.request_tap(br="br0", queues=4)

The loop is found when a call is made: trio when the caller runs under
``trio.run``, else the running asyncio loop (uvloop too: it only needs
``add_reader``/``add_writer``).  The socket is non-blocking and every wait
goes through the loop, so a slow or wedged tapd never blocks it; ``timeout``
bounds the whole call.  Cancelling a call closes whatever fds had arrived.

Standard library only at import time: neither asyncio nor trio is imported
here (a loop that runs has imported its own).
"""

from __future__ import annotations

import socket
import sys

from . import scm
from .exchange import (
    EOF,
    CallError,
    ClientError,
    Exchange,
    TapGrant,
    check_timeout,
    connect_failed,
    helper_grant,
    helper_request,
    lease_of,
    leases_of,
    no_answer,
    prepare_request,
    send_failed,
    socket_path,
    tap_grant,
    tap_request,
)

TYPE_CHECKING = False  # typing costs a client ~2 ms to import; mypy reads this as usual
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from typing import Any, Protocol

    class _Loop(Protocol):
        """What a call needs of the event loop it runs on."""

        async def wait_readable(self, sock: socket.socket) -> None: ...
        async def wait_writable(self, sock: socket.socket) -> None: ...
        async def sleep(self, seconds: float) -> None: ...
        async def within(
            self, timeout: float | None, where: str, work: Callable[[], Awaitable[None]]
        ) -> None: ...


__all__ = [
    "CallError",
    "ClientError",
    "TapGrant",
    "bridge_helper",
    "call",
    "hello",
    "leases",
    "prepare_tap",
    "release",
    "request_tap",
    "status",
]


class _Asyncio:
    def __init__(self, asyncio: Any) -> None:
        self.asyncio = asyncio
        self.loop = asyncio.get_running_loop()  # RuntimeError outside a running loop

    async def _wait(self, sock: socket.socket, add: Any, remove: Any) -> None:
        ready = self.loop.create_future()
        # The loop calls back on every round the fd stays ready, until removed.
        add(sock.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            remove(sock.fileno())

    async def wait_readable(self, sock: socket.socket) -> None:
        await self._wait(sock, self.loop.add_reader, self.loop.remove_reader)

    async def wait_writable(self, sock: socket.socket) -> None:
        await self._wait(sock, self.loop.add_writer, self.loop.remove_writer)

    async def sleep(self, seconds: float) -> None:
        await self.asyncio.sleep(seconds)

    async def within(
        self, timeout: float | None, where: str, work: Callable[[], Awaitable[None]]
    ) -> None:
        if timeout is None:
            await work()
            return
        scope = self.asyncio.timeout(timeout)
        try:
            async with scope:
                await work()
        except TimeoutError:
            if scope.expired():  # not an ETIMEDOUT of the socket's
                raise no_answer(where) from None
            raise


class _Trio:
    def __init__(self, trio: Any) -> None:
        self.trio = trio

    async def wait_readable(self, sock: socket.socket) -> None:
        await self.trio.lowlevel.wait_readable(sock)

    async def wait_writable(self, sock: socket.socket) -> None:
        await self.trio.lowlevel.wait_writable(sock)

    async def sleep(self, seconds: float) -> None:
        await self.trio.sleep(seconds)

    async def within(
        self, timeout: float | None, where: str, work: Callable[[], Awaitable[None]]
    ) -> None:
        if timeout is None:
            await work()
            return
        with self.trio.move_on_after(timeout) as scope:
            await work()
        if scope.cancelled_caught:
            raise no_answer(where)


def _current_loop() -> _Loop:
    """The loop this call runs on.  Nothing is imported: a loop that runs has
    imported its own module."""
    trio = sys.modules.get("trio")
    if trio is not None and trio.lowlevel.in_trio_run():
        return _Trio(trio)
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        try:
            return _Asyncio(asyncio)
        except RuntimeError:
            pass
    raise RuntimeError("tapd.aio needs a running asyncio or trio loop; tapd.client is the sync one")


#: a full listen backlog (EAGAIN on connect) is tried again after these waits,
#: then every last one: a UNIX socket gives no readiness to wait for there
#: (net/unix/af_unix.c unix_stream_connect() sleeps on the listener's queue
#: only for a blocking caller)
_CONNECT_BACKOFF = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)


async def _connect(loop: _Loop, sock: socket.socket, where: str) -> None:
    tries = 0
    while True:
        try:
            sock.connect(where)
            return
        except BlockingIOError:
            await loop.sleep(_CONNECT_BACKOFF[min(tries, len(_CONNECT_BACKOFF) - 1)])
            tries += 1
        except OSError as exc:
            raise connect_failed(where, exc) from None


async def _send(loop: _Loop, sock: socket.socket, line: bytes, fds: Sequence[int]) -> None:
    for piece, run in scm.plan(line, fds):
        anc = scm.ancillary(run)
        while True:
            try:
                sent = sock.sendmsg([piece], anc)
                break
            except BlockingIOError:
                await loop.wait_writable(sock)
        while sent < len(piece):
            try:
                sent += sock.send(piece[sent:])
            except BlockingIOError:
                await loop.wait_writable(sock)


async def _recv(loop: _Loop, sock: socket.socket) -> scm.Received:
    while True:
        try:
            return scm.received(sock.recvmsg(scm.RECV_BYTES, scm.ANCBUF, socket.MSG_CMSG_CLOEXEC))
        except BlockingIOError:
            await loop.wait_readable(sock)
        except ConnectionResetError:
            return EOF


async def call(
    request: dict[str, Any],
    *,
    path: str | None = None,
    fds: Sequence[int] = (),
    timeout: float | None = 60.0,
) -> tuple[dict[str, Any], list[int]]:
    """Send one request; return the reply and the fds that came with it.

    Raises :class:`~tapd.exchange.CallError`.  The caller owns the returned
    fds.  ``timeout`` bounds the whole call.
    """
    where = socket_path(path)
    check_timeout(timeout)
    loop = _current_loop()
    exchange = Exchange(request, fds)
    sock = socket.socket(
        socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    )

    async def work() -> None:
        await _connect(loop, sock, where)
        try:
            await _send(loop, sock, exchange.line, exchange.fds)
        except (BrokenPipeError, ConnectionResetError):
            pass  # tapd may have answered before it closed (overloaded): read on
        except OSError as exc:
            raise send_failed(exc) from None
        while not exchange.receive(await _recv(loop, sock)):
            pass

    try:
        await loop.within(timeout, where, work)
        return exchange.result()
    finally:
        exchange.close()
        sock.close()


async def request_tap(
    *,
    path: str | None = None,
    send_fds: Sequence[int] = (),
    timeout: float | None = 60.0,
    **options: Any,
) -> TapGrant:
    """Ask for a tap, as :func:`tapd.client.request_tap`."""
    return tap_grant(*await call(tap_request(options), path=path, fds=send_fds, timeout=timeout))


async def prepare_tap(
    *, path: str | None = None, timeout: float | None = 60.0, **options: Any
) -> dict[str, Any]:
    """A persistent tap the VMM opens by name, as :func:`tapd.client.prepare_tap`."""
    return await _simple(prepare_request(options), path, timeout)


async def _simple(
    request: dict[str, Any], path: str | None, timeout: float | None
) -> dict[str, Any]:
    reply, fds = await call(request, path=path, timeout=timeout)
    scm.close_all(fds)
    return reply


async def hello(*, path: str | None = None, timeout: float | None = 60.0) -> dict[str, Any]:
    """The daemon's protocol, version and ops."""
    return await _simple({"op": "hello"}, path, timeout)


async def leases(*, path: str | None = None, timeout: float | None = 60.0) -> list[dict[str, Any]]:
    """Your leases (root: every lease)."""
    return leases_of(await _simple({"op": "list"}, path, timeout))


async def release(
    lease: str, *, path: str | None = None, timeout: float | None = 60.0
) -> dict[str, Any]:
    """End one of your leases by id or ifname: its tap is removed at once."""
    return lease_of(await _simple({"op": "release", "lease": lease}, path, timeout))


async def status(*, path: str | None = None, timeout: float | None = 60.0) -> dict[str, Any]:
    """The daemon's version, uptime, counts and config file (absent on the
    built-in defaults)."""
    return await _simple({"op": "status"}, path, timeout)


async def bridge_helper(
    br: str | None,
    vnet_hdr: bool | None,
    vmm_socket: int | None = None,
    *,
    path: str | None = None,
    timeout: float | None = 60.0,
) -> TapGrant:
    """A tap whose lease belongs to this process's parent (QEMU's helper
    protocol), as :func:`tapd.client.bridge_helper`."""
    fds = [] if vmm_socket is None else [vmm_socket]
    return helper_grant(
        *await call(helper_request(br, vnet_hdr), path=path, fds=fds, timeout=timeout)
    )
