"""Knowing a lease's owner process, robustly against pid reuse.

A pid alone may name another process tomorrow.  tapd therefore holds a pidfd
for every owner (taken from the connection itself with SO_PEERPIDFD where the
kernel has it), and records the owner's start time next to its pid so that a
restarted tapd can tell the same process from a new one with the same pid.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from typing import Any

#: <asm-generic/socket.h>: SO_PEERPIDFD (Linux 6.5): a pidfd for the peer
#: process as of connect(), with no window for pid reuse.
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


_UCRED = struct.Struct("iII")  # <sys/socket.h> struct ucred: pid_t pid; uid_t uid; gid_t gid


def peer_cred(sock: Any) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a UNIX socket, as
    the kernel recorded them when it connected (or made the socketpair)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def peer_pidfd(sock: Any, pid: int) -> int | None:
    """A pidfd for the process at the other end of ``sock``, or None if it is
    already gone."""
    try:
        fd = int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
        os.set_inheritable(fd, False)
        return fd
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            return None  # the peer is gone: its pid may already be another's
    # Kernels before 6.5: the pid SO_PEERCRED reported (the caller checks it).
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited.  (poll, not
    select: with a pidfd per lease, fd numbers pass select's 1024.)"""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _stat_field(pid: int, field: int) -> int | None:
    """Numeric field ``field`` (1-based, as in proc(5)) of /proc/PID/stat."""
    # os.open/os.read, not open(): no buffered file object for one read (this
    # is on every request's path).  The line is well under a page.
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None  # gone; any other failure (EMFILE...) is not "exited"
    try:
        stat = os.read(fd, 4096)
    except ProcessLookupError:
        return None
    finally:
        os.close(fd)
    # The command name (field 2) may hold spaces and parentheses: split after
    # its last ')'.  What follows starts at field 3.
    rest = stat[stat.rindex(b")") + 2 :].split()
    try:
        return int(rest[field - 3])
    except (IndexError, ValueError):
        return None


def starttime(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks."""
    return _stat_field(pid, 22)


def parent(pidfd: int, pid: int) -> tuple[int, int] | None:
    """(pid, pidfd) of the parent of the live process ``pidfd``/``pid``.

    The parent's pid is read, a pidfd opened for it, and then the child is
    checked to be still alive and still that pid's child: a parent that had
    exited in between would have left its child reparented, so the pidfd is
    known to hold the real parent, not a process that reused its pid.
    """
    ppid = _stat_field(pid, 4)
    if ppid is None or ppid <= 1:
        return None
    try:
        ppidfd = os.pidfd_open(ppid)
    except OSError:
        return None
    if exited(pidfd) or _stat_field(pid, 4) != ppid:
        os.close(ppidfd)
        return None
    return ppid, ppidfd


def identify(pidfd: int, pid: int) -> int | None:
    """The start time of the process ``pidfd`` holds, read through its pid and
    confirmed by the pidfd still being live (so the pid was not reused)."""
    start = starttime(pid)
    if start is None or exited(pidfd):
        return None
    return start


def reopen(pid: int, start: int) -> int | None:
    """A pidfd for the process that was ``pid`` started at ``start``, or None
    if that process is gone (the pid free, or taken by another)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    if identify(pidfd, pid) != start:
        os.close(pidfd)
        return None
    return pidfd
