"""The daemon's socket side: accept, know the peer, read lines, answer.

Each connection is its own trio task; nothing one client does (a malformed
line, a disconnect mid-request, an idle socket) reaches another.  Requests are
carried out by :class:`~tapd.service.Service`; this module only moves bytes
and fds (through :mod:`tapd.fdpass`) and maps exceptions to replies (through
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
from .errors import (
    ClientError,
    Denied,
    FdsRefused,
    LineTooLong,
    Overloaded,
    RequestTimeout,
    TapdError,
    TooManyFds,
    to_wire,
)
from .fdpass import MAX_FDS_PER_MSG
from .lifecycle import Grant
from .models import MAX_TAP_QUEUES
from .owner import Peer, peer_of
from .service import Service

#: accept() errors that mean "the host is short of something", not "the
#: listening socket is broken": back off and try again (as trio's serve_listeners).
ACCEPT_OVERLOAD = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

#: the most fds one request line may bring: a full set of tap queues and as
#: many vhost fds.  More is refused before it can fill tapd's fd table.
MAX_FDS_PER_REQUEST = 2 * MAX_TAP_QUEUES

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
        self.held_fds = 0
        self.fd_budget = max(
            MAX_FDS_PER_REQUEST, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4
        )
        #: the same per uid, against [server] max_fds_per_uid: one uid parking
        #: fds on lines it never finishes cannot use up the global budget
        self._held_per_uid: Counter[int] = Counter()
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

    def _hold(self, uid: int, count: int) -> None:
        self.held_fds += count
        self._held_per_uid[uid] += count
        if not self._held_per_uid[uid]:
            del self._held_per_uid[uid]

    def _let_go(self, uid: int, fds: list[int], whose: str) -> None:
        """Hand ``fds`` a client sent to the closers, and stop counting them."""
        if fds:
            self.closers.give(fds, whose)
            self._hold(uid, -len(fds))

    def _too_many(self, uid: int, pending: int, truncated: bool) -> TooManyFds | None:
        per_uid = self.config.server.max_fds_per_uid
        if truncated or pending > MAX_FDS_PER_REQUEST:
            return TooManyFds(
                f"too many file descriptors: one message carries at most "
                f"{MAX_FDS_PER_MSG} and one request at most "
                f"{MAX_FDS_PER_REQUEST}; none were kept"
            )
        if self._held_per_uid[uid] > per_uid:
            return TooManyFds(
                f"uid {uid} has {self._held_per_uid[uid]} file descriptors waiting in "
                f"tapd on requests not yet complete, more than one uid may "
                f"(server.max_fds_per_uid = {per_uid}); none were kept"
            )
        if self.held_fds > self.fd_budget:
            return TooManyFds(
                "tapd holds as many file descriptors from clients as it takes; "
                "none were kept; try again shortly"
            )
        return None

    async def _serve_connection(
        self, sock: socket.socket, conn: int, peer: Peer, log: logging.Logger, whose: str
    ) -> None:
        lines = protocol.LineBuffer()
        seq = itertools.count(1)
        server = self.config.server
        timeout = server.request_timeout
        # However busy, a connection ends at its lifetime: a hello every few
        # seconds must not hold a slot for ever.
        end_of_life = trio.current_time() + server.connection_lifetime
        # fds that arrived with bytes of a line not yet complete: they belong
        # to that line's request.
        pending: list[int] = []
        # The deadline covers a whole request, not each read, so a client that
        # trickles one byte at a time cannot hold a connection forever.
        deadline = min(trio.current_time() + timeout, end_of_life)
        handled = 0
        try:
            while True:
                received = None
                with trio.move_on_at(deadline):
                    received = await fdpass.recv(sock)
                if received is None:
                    await self._time_out(sock, log, end_of_life)
                    return
                pending += received.fds
                self._hold(peer.uid, len(received.fds))
                if received.fds and not self.closers.healthy:
                    # tapd could not let go of these fds now: refuse, loudly.
                    log.warning(
                        "request.refused",
                        outcome="refused",
                        code=FdsRefused.code,
                        fds=len(received.fds),
                        stuck_closers=len(self.closers.stuck),
                    )
                    await self._reply_quietly(
                        sock,
                        FdsRefused(
                            "tapd takes no file descriptors right now: its closers are "
                            "stuck on ones a client sent (the administrator has been "
                            "told who); send the request without fds, or try again later"
                        ),
                    )
                    return
                refusal = self._too_many(peer.uid, len(pending), received.truncated)
                if refusal is not None:
                    log.warning(
                        "request.refused",
                        outcome="refused",
                        code=refusal.code,
                        fds=len(pending),
                        uid_fds=self._held_per_uid[peer.uid],
                        held_fds=self.held_fds,
                    )
                    await self._reply_quietly(sock, refusal)
                    return
                if not received.data:
                    return  # the peer closed its end
                lines.feed(received.data)
                try:
                    while (line := lines.next_line()) is not None:
                        if handled:
                            # Sends and receives that need not wait do not
                            # yield (tapd.fdpass): a client pipelining many
                            # lines must still let the other connections run.
                            await trio.lowlevel.checkpoint()
                        handled += 1
                        fds, pending = pending, []
                        self._enter()
                        try:
                            await self._one(
                                sock, line, fds, peer, log.bind(request=f"{conn}.{next(seq)}")
                            )
                        finally:
                            self._let_go(peer.uid, fds, whose)
                            self._leave()
                        if trio.current_time() >= end_of_life:
                            await self._time_out(sock, log, end_of_life)
                            return
                        deadline = min(trio.current_time() + timeout, end_of_life)
                except LineTooLong as exc:
                    log.warning("request.refused", outcome="refused", code=exc.code)
                    await self._reply_quietly(sock, exc)
                    return
        finally:
            self._let_go(peer.uid, pending, whose)

    async def _time_out(self, sock: socket.socket, log: logging.Logger, end_of_life: float) -> None:
        server = self.config.server
        if trio.current_time() >= end_of_life:
            lifetime = server.connection_lifetime
            log.info("connection.timeout", lifetime=lifetime)
            message = (
                f"this connection has been open {lifetime:g} s, the most tapd allows "
                "(server.connection_lifetime); closing it: connect again"
            )
        else:
            log.info("connection.timeout", seconds=server.request_timeout)
            message = (
                f"no complete request within {server.request_timeout:g} s; closing the connection"
            )
        await self._reply_quietly(sock, RequestTimeout(message))

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
