"""The daemon's socket side: accept, know the peer, read lines, answer.

Each connection is its own trio task; nothing one client does (a malformed
line, a disconnect mid-request, an idle socket) reaches another.  Requests are
turned into replies by :class:`Service`; this module only moves bytes and fds
(through :mod:`tapd.fdpass`) and maps exceptions to replies (through
:func:`tapd.errors.to_wire`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import socket
import struct
from typing import Any

import trio
from pydantic import BaseModel

from . import PROTOCOL_VERSION, __version__, fdpass, protocol
from . import log as logging
from .config import Config
from .errors import (
    ClientError,
    Denied,
    LineTooLong,
    Overloaded,
    RequestTimeout,
    TapdError,
    TooManyFds,
    to_wire,
)
from .models import REQUEST_MODELS, HelloReply, HelloRequest, TapReply, TapRequest
from .options import plan_create
from .policy import Peer, check
from .taps import TapMaker, TapSpec
from .tun import close_all
from .worker import KernelWorker

#: accept() errors that mean "the host is short of something", not "the
#: listening socket is broken": back off and try again (as trio's serve_listeners).
ACCEPT_OVERLOAD = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # <asm-generic/socket.h>


def peer_of(sock: trio.socket.SocketType) -> Peer:
    """The peer's credentials, as the kernel recorded them at connect time."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = tuple(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        groups = ()
    return Peer(uid=uid, gid=gid, pid=pid, groups=groups)


class Service:
    """Turns one validated request into a reply (and the fds to send with it)."""

    def __init__(self, config: Config, maker: TapMaker, worker: KernelWorker) -> None:
        self.config = config
        self.maker = maker
        self.worker = worker

    async def handle(
        self, peer: Peer, request: HelloRequest | TapRequest, log: Any
    ) -> tuple[BaseModel, list[int]]:
        if isinstance(request, HelloRequest):
            return (
                HelloReply(
                    protocol=PROTOCOL_VERSION, version=__version__, ops=tuple(REQUEST_MODELS)
                ),
                [],
            )
        return await self._request(peer, request, log)

    async def _request(
        self, peer: Peer, request: TapRequest, log: Any
    ) -> tuple[BaseModel, list[int]]:
        plan = plan_create(request)
        decision = check(self.config, peer, plan.bridge, plan.queues)
        log = log.bind(
            bridge=plan.bridge, ifname=plan.ifname, queues=plan.queues, rule=decision.rule
        )
        spec = TapSpec(
            bridge=plan.bridge,
            ifname=plan.ifname,
            queues=plan.queues,
            vnet_hdr=plan.vnet_hdr,
            sndbuf=plan.sndbuf,
            owner_uid=peer.uid,
            name_template=self.config.taps.name_template,
        )
        made = await self.worker.run(self.maker.make, spec)
        reply = TapReply(
            ifname=made.ifname,
            bridge=made.bridge,
            fds=len(made.fds),
            vhostfds=0,
            vnet_hdr=made.vnet_hdr,
            vnet_hdr_len=made.vnet_hdr_len,
            mac=made.mac,
            mtu=made.mtu,
            warnings=tuple(made.warnings),
        )
        log.info("request.granted", outcome="granted", ifname=made.ifname, mac=made.mac)
        return reply, made.fds


class Server:
    def __init__(self, service: Service, config: Config) -> None:
        self.service = service
        self.config = config
        self.connections = 0
        self._ids = itertools.count(1)
        self.log = logging.get()

    async def serve(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            backoff = 0.01
            while True:
                try:
                    sock, _ = await listener.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_OVERLOAD:
                        raise
                    self.log.warning("server.accept.overloaded", errno=exc.errno, retry_in=backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                backoff = 0.01
                nursery.start_soon(self._connection, sock)

    async def _connection(self, sock: trio.socket.SocketType) -> None:
        conn = next(self._ids)
        with sock:
            try:
                peer = peer_of(sock)
            except OSError as exc:
                self.log.warning("connection.refused", conn=conn, error=str(exc))
                return
            log = self.log.bind(conn=conn, uid=peer.uid, gid=peer.gid, pid=peer.pid)
            if self.connections >= self.config.server.max_connections:
                log.warning("connection.overloaded", connections=self.connections)
                await self._reply_quietly(
                    sock,
                    Overloaded(
                        "tapd is serving its maximum number of connections; try again shortly"
                    ),
                )
                return
            self.connections += 1
            try:
                await self._serve_connection(sock, conn, peer, log)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.info("connection.lost", error=str(exc))
            finally:
                self.connections -= 1

    async def _reply_quietly(self, sock: trio.socket.SocketType, error: TapdError) -> None:
        """A last error reply before closing; the peer may already be gone."""
        with contextlib.suppress(OSError):
            await fdpass.send_line(sock, protocol.encode(error.to_wire()), [])

    async def _serve_connection(
        self, sock: trio.socket.SocketType, conn: int, peer: Peer, log: Any
    ) -> None:
        lines = protocol.LineBuffer()
        seq = itertools.count(1)
        timeout = self.config.server.request_timeout
        # The deadline covers a whole request, not each read, so a client that
        # trickles one byte at a time cannot hold a connection forever.
        deadline = trio.current_time() + timeout
        while True:
            received = None
            with trio.move_on_at(deadline):
                received = await fdpass.recv(sock)
            if received is None:
                log.info("connection.timeout", seconds=timeout)
                await self._reply_quietly(
                    sock,
                    RequestTimeout(
                        f"no complete request within {timeout:g} s; closing the connection"
                    ),
                )
                return
            # No request in this version takes fds from a client: any that
            # arrive are closed at once.
            close_all(received.fds)
            if received.truncated:
                log.warning("request.invalid", code=TooManyFds.code)
                await self._reply_quietly(
                    sock,
                    TooManyFds(
                        "too many file descriptors in one message (the kernel carries "
                        "at most 253); none were kept"
                    ),
                )
                return
            if not received.data:
                return  # the peer closed its end
            lines.feed(received.data)
            try:
                while (line := lines.next_line()) is not None:
                    await self._one(sock, line, peer, log.bind(request=f"{conn}.{next(seq)}"))
                    deadline = trio.current_time() + timeout
            except LineTooLong as exc:
                log.warning("request.invalid", code=exc.code)
                await self._reply_quietly(sock, exc)
                return

    async def _one(self, sock: trio.socket.SocketType, line: bytes, peer: Peer, log: Any) -> None:
        fds: list[int] = []
        try:
            request = protocol.decode_request(line)
            log = log.bind(op=request.op)
            reply, fds = await self.service.handle(peer, request, log)
            wire: BaseModel | dict[str, Any] = reply
        except ClientError as exc:
            outcome = "denied" if isinstance(exc, Denied) else "refused"
            log.info(f"request.{outcome}", outcome=outcome, code=exc.code, message=exc.message)
            wire = to_wire(exc)
        except TapdError as exc:
            log.warning("request.failed", outcome="failed", code=exc.code, message=exc.message)
            wire = to_wire(exc)
        except Exception as exc:
            log.exception("request.failed", outcome="failed", code="internal-error")
            wire = to_wire(exc)
        try:
            await fdpass.send_line(sock, protocol.encode(wire), fds)
        finally:
            # Our copies go: once the VM closes its own, the tap is gone.
            close_all(fds)
