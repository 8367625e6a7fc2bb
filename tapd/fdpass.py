"""Passing file descriptors over a UNIX stream socket (``SCM_RIGHTS``).

The one place tapd calls ``sendmsg``/``recvmsg`` with ancillary data.  The
kernel carries at most :data:`MAX_FDS_PER_MSG` fds in one message
(include/net/scm.h: SCM_MAX_FD), so a reply with more fds is sent as several
messages: the reply's line is cut into pieces and each piece carries the next
run of fds.  A reader that collects the fds of every piece until the line's
newline therefore has all of them, in order, when it has the reply.
"""

from __future__ import annotations

import array
import socket
from collections.abc import Sequence

import trio

from .tun import close_all

#: include/net/scm.h: SCM_MAX_FD.  The 254th fd in one sendmsg is EINVAL.
MAX_FDS_PER_MSG = 253

#: room for a full message of fds in every recvmsg
ANCBUF = socket.CMSG_SPACE(MAX_FDS_PER_MSG * array.array("i").itemsize)
RECV_BYTES = 65536


def plan(line: bytes, fds: Sequence[int]) -> list[tuple[bytes, list[int]]]:
    """Cut ``line`` into pieces that each carry at most MAX_FDS_PER_MSG fds.

    Every piece but the last is one byte long, and the last holds the newline,
    so every fd travels before the end of the line.
    """
    runs = [list(fds[i : i + MAX_FDS_PER_MSG]) for i in range(0, len(fds), MAX_FDS_PER_MSG)]
    if len(runs) <= 1:
        return [(line, runs[0] if runs else [])]
    if len(line) < len(runs):
        raise ValueError("line too short to carry that many fds")
    pieces = [(line[i : i + 1], run) for i, run in enumerate(runs[:-1])]
    pieces.append((line[len(runs) - 1 :], runs[-1]))
    return pieces


def _ancillary(fds: list[int]) -> list[tuple[int, int, bytes]]:
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def unpack(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds in a recvmsg's ancillary data (whole ints only)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:whole]))
    return fds


# The async pair below take a non-blocking stdlib socket and call the kernel
# straight away, waiting through trio only when it says EAGAIN.  trio's own
# socket methods yield to the scheduler on every call, ready or not: a round
# of the loop each (~50 us on these machines) for a reply that could go out
# at once.  Callers that loop over many lines checkpoint themselves.


async def send_line(sock: socket.socket, line: bytes, fds: Sequence[int]) -> None:
    """Send one line with ``fds`` on non-blocking ``sock``.  The caller still
    owns (and closes) the fds."""
    for piece, run in plan(line, fds):
        ancillary = _ancillary(run)
        while True:
            try:
                sent = sock.sendmsg([piece], ancillary)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
        while sent < len(piece):
            try:
                sent += sock.send(piece[sent:])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)


def send_line_sync(sock: socket.socket, line: bytes, fds: Sequence[int]) -> None:
    for piece, run in plan(line, fds):
        sent = sock.sendmsg([piece], _ancillary(run))
        if sent < len(piece):
            sock.sendall(piece[sent:])


class Received:
    """One recvmsg's worth: bytes, the fds that came with them, and whether the
    kernel had to drop fds for lack of room (``MSG_CTRUNC``)."""

    __slots__ = ("data", "fds", "truncated")

    def __init__(self, data: bytes, fds: list[int], truncated: bool) -> None:
        self.data = data
        self.fds = fds
        self.truncated = truncated

    def close_fds(self) -> None:
        close_all(self.fds)
        self.fds = []


async def recv(sock: socket.socket, nbytes: int = RECV_BYTES) -> Received:
    """What non-blocking ``sock`` has, waiting until it has something."""
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(nbytes, ANCBUF, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        return Received(data, unpack(ancdata), bool(flags & socket.MSG_CTRUNC))


def recv_sync(sock: socket.socket, nbytes: int = RECV_BYTES) -> Received:
    data, ancdata, flags, _ = sock.recvmsg(nbytes, ANCBUF, socket.MSG_CMSG_CLOEXEC)
    return Received(data, unpack(ancdata), bool(flags & socket.MSG_CTRUNC))
