"""File descriptors over a UNIX stream socket (``SCM_RIGHTS``): the layout both
sides of tapd's socket follow, and the blocking send and receive.

The kernel carries at most :data:`MAX_FDS_PER_MSG` fds in one message
(include/net/scm.h: SCM_MAX_FD), so a line with more fds is sent as several
messages: the line is cut into pieces and each piece carries the next run of
fds.  A reader that collects the fds of every piece until the line's newline
therefore has all of them, in order, when it has the line.

Standard library only, like :mod:`tapd.wire`: the clients use it as it is,
and the daemon's trio side (:mod:`tapd.fdpass`) builds on it, so the two
cannot cut or read a message differently.
"""

from __future__ import annotations

import _socket
import os
import struct

# _socket is the C module socket.py wraps: the wrapper's enums and its import of
# selectors cost a process started per VM 2 ms, a tenth of an interpreter start.
# fds are packed with struct, not array: array imports collections.abc, and
# with it collections, operator, itertools, keyword and reprlib.

TYPE_CHECKING = False  # typing costs a client ~2 ms to import; mypy reads this as usual
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

#: include/net/scm.h: SCM_MAX_FD.  The 254th fd in one sendmsg is EINVAL.
MAX_FDS_PER_MSG = 253

_INT_SIZE = struct.calcsize("i")
#: room for a full message of fds in every recvmsg
ANCBUF = _socket.CMSG_SPACE(MAX_FDS_PER_MSG * _INT_SIZE)
RECV_BYTES = 65536


def close_all(fds: Iterable[int]) -> None:
    """Close every fd, whatever happened to the others."""
    for fd in fds:
        try:  # noqa: SIM105 (contextlib: one more import for a process started per VM)
            os.close(fd)
        except OSError:
            pass


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


def ancillary(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """``sendmsg``'s ancillary data for ``fds`` (none for no fds)."""
    if not fds:
        return []
    return [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]


def unpack(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds in a recvmsg's ancillary data (whole ints only)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            whole = len(data) - len(data) % _INT_SIZE
            fds.extend(struct.unpack(f"{whole // _INT_SIZE}i", data[:whole]))
    return fds


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


def received(result: tuple[bytes, list[tuple[int, int, bytes]], int, object]) -> Received:
    """What a ``recvmsg(nbytes, ANCBUF, MSG_CMSG_CLOEXEC)`` returned, as a :class:`Received`."""
    data, ancdata, flags, _ = result
    return Received(data, unpack(ancdata), bool(flags & _socket.MSG_CTRUNC))


def send_line_sync(sock: _socket.socket, line: bytes, fds: Sequence[int]) -> None:
    """Send one line with ``fds`` on blocking ``sock``.  The caller still owns
    (and closes) the fds."""
    for piece, run in plan(line, fds):
        sent = sock.sendmsg([piece], ancillary(run))
        if sent < len(piece):
            sock.sendall(piece[sent:])


def recv_sync(sock: _socket.socket, nbytes: int = RECV_BYTES) -> Received:
    """What blocking ``sock`` has, waiting until it has something (b"" at its end)."""
    return received(sock.recvmsg(nbytes, ANCBUF, _socket.MSG_CMSG_CLOEXEC))
