"""Passing file descriptors on the daemon's trio loop.

The layout of a message (at most 253 fds each, the line cut so that every fd
travels before its newline) and the blocking calls are :mod:`tapd.scm`'s,
shared with the clients; this module adds the non-blocking pair the server
awaits, and re-exports the rest so that the daemon has one place to look.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import trio

from .scm import (
    ANCBUF,
    MAX_FDS_PER_MSG,
    RECV_BYTES,
    Received,
    ancillary,
    plan,
    received,
    recv_sync,
    send_line_sync,
    unpack,
)

__all__ = [
    "ANCBUF",
    "MAX_FDS_PER_MSG",
    "RECV_BYTES",
    "Received",
    "plan",
    "recv",
    "recv_sync",
    "send_line",
    "send_line_sync",
    "unpack",
]

# The async pair below take a non-blocking stdlib socket and call the kernel
# straight away, waiting through trio only when it says EAGAIN.  trio's own
# socket methods yield to the scheduler on every call, ready or not: a round
# of the loop each (~50 us on these machines) for a reply that could go out
# at once.  Callers that loop over many lines checkpoint themselves.


async def send_line(sock: socket.socket, line: bytes, fds: Sequence[int]) -> None:
    """Send one line with ``fds`` on non-blocking ``sock``.  The caller still
    owns (and closes) the fds."""
    for piece, run in plan(line, fds):
        anc = ancillary(run)
        while True:
            try:
                sent = sock.sendmsg([piece], anc)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
        while sent < len(piece):
            try:
                sent += sock.send(piece[sent:])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)


async def recv(sock: socket.socket, nbytes: int = RECV_BYTES) -> Received:
    """What non-blocking ``sock`` has, waiting until it has something."""
    while True:
        try:
            return received(sock.recvmsg(nbytes, ANCBUF, socket.MSG_CMSG_CLOEXEC))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
