"""The daemon's socket side: accept, know the peer, read lines, answer.

Each connection is its own trio task; nothing one client does (a malformed
line, a disconnect mid-request, an idle socket) reaches another.  Requests are
carried out by :class:`~tapd.service.Service`; this module only moves bytes
and fds (through :mod:`tapd.fdpass`), keeps each connection's state in a
:class:`~tapd.connection.Connection`, and maps exceptions to replies (through
:func:`tapd.errors.to_wire`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import resource
import socket
import time
from collections import Counter
from typing import Any

import trio

from . import fdpass, protocol
from . import log as logging
from .closer import Closers
from .config import Config
from .connection import MAX_FDS_PER_REQUEST, Connection, FdBudget
from .errors import (
    ClientError,
    Denied,
    FdsRefused,
    Overloaded,
    ProtocolError,
    RequestTimeout,
    TapdError,
    to_wire,
)
from .lifecycle import Grant
from .owner import Peer, peer_of
from .service import Service

#: accept() errors that mean "the host is short of something", not "the
#: listening socket is broken": back off and try again (as trio's serve_listeners).
ACCEPT_OVERLOAD = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

#: connections accepted in a row before the accept loop lets others run
ACCEPT_BATCH = 64


class Server:
    def __init__(self, service: Service, closers: Closers) -> None:
        self.service = service
        #: where every fd a client sent, and every client connection, goes to
        #: be closed: never closed here (see tapd.closer)
        self.closers = closers
        self._ids = itertools.count(1)
        self.log = logging.get()
        #: requests being carried out right now (a clean stop waits for them)
        self.busy = 0
        #: open connections per uid: one uid cannot take every slot
        self._per_uid: Counter[int] = Counter()
        #: fds received and not yet closed, over every connection, and the most
        #: tapd will hold that way: a quarter of its open-file limit, so that
        #: clients parking fds cannot starve the taps and pidfds of the rest
        self.client_fds = FdBudget(
            max(MAX_FDS_PER_REQUEST, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)
        )
        self.idle = trio.Event()
        self.idle.set()

    @property
    def config(self) -> Config:
        return self.service.config

    async def serve(
        self,
        listener: socket.socket,
        connections: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept until cancelled.  Connections run in ``connections``, a
        nursery of the caller's, so that stopping the accept loop leaves the
        requests in flight to finish.

        ``listener`` is a stdlib socket, made non-blocking here: accept() is
        called straight away and trio only waits for it when nothing is
        pending (see :mod:`tapd.fdpass` for why).
        """
        listener.setblocking(False)
        task_status.started()
        backoff = 0.01
        accepted = 0
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            except OSError as exc:
                if exc.errno not in ACCEPT_OVERLOAD:
                    raise
                self.log.warning("server.accept.overloaded", errno=exc.errno, retry_in=backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.01
            sock.setblocking(False)
            connections.start_soon(self._connection, sock)
            accepted += 1
            if accepted % ACCEPT_BATCH == 0:
                # A flood of connections must not keep the loop from the
                # connections already accepted.
                await trio.lowlevel.checkpoint()

    async def _connection(self, sock: socket.socket) -> None:
        conn = next(self._ids)
        whose = f"conn={conn}"
        try:
            try:
                peer = peer_of(sock)
            except OSError as exc:
                self.log.warning("connection.refused", conn=conn, error=str(exc))
                return
            whose = f"uid={peer.uid} pid={peer.pid} conn={conn}"
            try:
                await self._admitted(sock, conn, peer, whose)
            finally:
                if peer.pidfd >= 0:
                    os.close(peer.pidfd)  # tapd's own pidfd: closing it waits on nothing
        finally:
            # Its last close may release fds still queued on it (tapd.closer).
            self.closers.give_socket(sock, whose)

    async def _admitted(self, sock: socket.socket, conn: int, peer: Peer, whose: str) -> None:
        log = self.log.bind(conn=conn, uid=peer.uid, gid=peer.gid, pid=peer.pid)
        service = self.service
        limit = self.config.server.max_connections
        if peer.uid == 0:
            # Kept for root: no number of other uids can lock the admin out.
            limit += self.config.server.root_reserved_connections
        if service.connections >= limit:
            log.warning("connection.overloaded", connections=service.connections)
            await self._reply_quietly(
                sock,
                Overloaded("tapd is serving its maximum number of connections; try again shortly"),
            )
            return
        per_uid = self.config.server.max_connections_per_uid
        if peer.uid != 0 and self._per_uid[peer.uid] >= per_uid:
            log.warning("connection.overloaded", uid_connections=self._per_uid[peer.uid])
            await self._reply_quietly(
                sock,
                Overloaded(
                    f"uid {peer.uid} already has {per_uid} connections open to tapd; "
                    "close some, or wait"
                ),
            )
            return
        service.connections += 1
        self._per_uid[peer.uid] += 1
        try:
            await self._serve_connection(sock, conn, peer, log, whose)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("connection.lost", error=str(exc))
        except RequestTimeout as exc:
            log.info("connection.timeout", message=exc.message)
        finally:
            service.connections -= 1
            self._per_uid[peer.uid] -= 1
            if not self._per_uid[peer.uid]:
                del self._per_uid[peer.uid]

    def _enter(self) -> None:
        if not self.busy:
            self.idle = trio.Event()
        self.busy += 1

    def _leave(self) -> None:
        self.busy -= 1
        if not self.busy:
            self.idle.set()

    async def _reply_quietly(self, sock: socket.socket, error: TapdError) -> None:
        """A last error reply before closing; the peer may already be gone, or
        not reading (then it gets request_timeout to take it)."""
        self.service.metrics.refused(error)
        with contextlib.suppress(OSError), trio.move_on_after(self.config.server.request_timeout):
            await fdpass.send_line(sock, protocol.encode(to_wire(error)), [])

    async def _send(self, sock: socket.socket, line: bytes, fds: list[int]) -> None:
        """Send a reply, within request_timeout: a client that sends requests
        but never reads its replies must not hold a connection forever."""
        timeout = self.config.server.request_timeout
        with trio.move_on_after(timeout):
            await fdpass.send_line(sock, line, fds)
            return
        raise RequestTimeout(f"the client did not take its reply within {timeout:g} s")

    def _let_go(self, uid: int, fds: list[int], whose: str) -> None:
        """Hand ``fds`` a client sent to the closers, and stop counting them."""
        if fds:
            self.closers.give(fds, whose)
            self.client_fds.release(uid, len(fds))

    async def _serve_connection(
        self, sock: socket.socket, conn: int, peer: Peer, log: logging.Logger, whose: str
    ) -> None:
        """Read, answer, refuse: the I/O around a :class:`~tapd.connection.Connection`."""
        server = self.config.server
        state = Connection(
            peer.uid,
            self.client_fds,
            now=trio.current_time(),
            request_timeout=server.request_timeout,
            lifetime=server.connection_lifetime,
        )
        try:
            while True:
                received = None
                with trio.move_on_at(state.deadline):
                    received = await fdpass.recv(sock)
                if received is None:
                    await self._time_out(sock, log, state.timeout(trio.current_time()))
                    return
                try:
                    state.receive(
                        received.data,
                        received.fds,
                        received.truncated,
                        max_fds_per_uid=self.config.server.max_fds_per_uid,
                        accept_fds=not received.fds or self.closers.healthy,
                    )
                except FdsRefused as exc:
                    # tapd could not let go of these fds now: refuse, loudly.
                    log.warning(
                        "request.refused",
                        outcome="refused",
                        code=exc.code,
                        stuck_closers=len(self.closers.stuck),
                        **exc.context,
                    )
                    await self._reply_quietly(sock, exc)
                    return
                if not received.data:
                    return  # the peer closed its end
                while (request := state.next_request()) is not None:
                    line, fds = request
                    try:
                        if state.handled > 1:
                            # Sends and receives that need not wait do not
                            # yield (tapd.fdpass): a client pipelining many
                            # lines must still let the other connections run.
                            await trio.lowlevel.checkpoint()
                        self._enter()
                        try:
                            await self._one(
                                sock, line, fds, peer, log.bind(request=f"{conn}.{state.handled}")
                            )
                        finally:
                            self._leave()
                    finally:
                        self._let_go(peer.uid, fds, whose)
                    ended = state.answered(trio.current_time())
                    if ended is not None:
                        await self._time_out(sock, log, ended)
                        return
        except ProtocolError as exc:
            # More fds than may be kept (TooManyFds), a line too long.
            log.warning("request.refused", outcome="refused", code=exc.code, **exc.context)
            await self._reply_quietly(sock, exc)
        finally:
            self._let_go(peer.uid, state.close(), whose)

    async def _time_out(
        self, sock: socket.socket, log: logging.Logger, timeout: RequestTimeout
    ) -> None:
        log.info("connection.timeout", **timeout.context)
        await self._reply_quietly(sock, timeout)

    async def _one(
        self,
        sock: socket.socket,
        line: bytes,
        fds_in: list[int],
        peer: Peer,
        log: logging.Logger,
    ) -> None:
        started = time.perf_counter()
        grant: Grant | None = None
        op = ""  # for the metrics: "" until the line is a request
        error: BaseException | None = None
        try:
            request = protocol.decode_request(line)
            op = request.op
            log = log.bind(op=op)
            grant = await self.service.handle(peer, request, fds_in, log)
            wire: Any = grant.reply
        except Denied as exc:
            log.info(
                "request.denied",
                outcome="denied",
                code=exc.code,
                message=exc.message,
                **exc.context,
            )
            wire, error = to_wire(exc), exc
        except ClientError as exc:
            log.info(
                "request.refused",
                outcome="refused",
                code=exc.code,
                message=exc.message,
                **exc.context,
            )
            wire, error = to_wire(exc), exc
        except TapdError as exc:
            log.warning(
                "request.failed",
                outcome="failed",
                code=exc.code,
                message=exc.message,
                **exc.context,
            )
            wire, error = to_wire(exc), exc
        except Exception as exc:
            log.exception("request.failed", outcome="failed", code="internal-error")
            wire, error = to_wire(exc), exc
        metrics = self.service.metrics
        if grant is None:
            try:
                await self._send(sock, protocol.encode(wire), [])
            finally:
                metrics.request(op, started, error=error)
            return
        try:
            await self._send(sock, protocol.encode(wire), grant.fds)
        except BaseException:
            metrics.request(op, started, rule=grant.rule, delivered=False)
            log.warning("request.undelivered", ifname=getattr(grant.reply, "ifname", None))
            with trio.CancelScope(shield=True):
                await grant.abandon()
            raise
        metrics.request(op, started, rule=grant.rule, granted=grant.lease is not None)
        grant.sent()
