"""Who is asking, and whose tap it is: peers and owner processes.

A :class:`Peer` is the process at the other end of a connection, as the kernel
recorded it at connect time (SO_PEERCRED, SO_PEERGROUPS, SO_PEERPIDFD).  An
:class:`Owner` is the process a lease belongs to: the peer itself, its parent
(a bridge helper's VMM), or the process behind QEMU's helper socket.

A pid alone may name another process tomorrow.  tapd therefore holds a pidfd
for every owner (taken from the connection itself with SO_PEERPIDFD where the
kernel has it), and records the owner's start time next to its pid so that a
restarted tapd can tell the same process from a new one with the same pid.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from . import fdinfo
from .errors import Denied, OwnerGone

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


# -- the peer -------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """Who is on the other end, as the kernel reported at accept time."""

    uid: int
    gid: int
    pid: int
    groups: tuple[int, ...] = ()
    #: a pidfd for the peer process, held by the connection (-1: none)
    pidfd: int = field(default=-1, compare=False)

    def all_gids(self) -> frozenset[int]:
        return frozenset((self.gid, *self.groups))


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # <asm-generic/socket.h>

#: <linux/limits.h>: NGROUPS_MAX
_NGROUPS_MAX = 65536
_libc = ctypes.CDLL(None, use_errno=True)


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """SO_PEERGROUPS: every supplementary group of the peer.

    Python's getsockopt() takes at most 1024 bytes (256 groups); a peer in
    more makes the kernel answer ERANGE, and then libc's getsockopt() is
    asked with room for NGROUPS_MAX (65536).  Judging such a peer without
    its groups could slip past a [[deny]] rule that names one of them.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
    except OSError as exc:
        if exc.errno != errno.ERANGE:
            raise
        buf = ctypes.create_string_buffer(_NGROUPS_MAX * 4)
        size = ctypes.c_uint32(len(buf))
        if _libc.getsockopt(
            sock.fileno(), socket.SOL_SOCKET, SO_PEERGROUPS, buf, ctypes.byref(size)
        ):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err)) from None
        raw = buf.raw[: size.value]
    return tuple(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))


def peer_of(sock: socket.socket) -> Peer:
    """The peer's credentials, as the kernel recorded them at connect time,
    and a pidfd for its process (the caller closes it)."""
    pid, uid, gid = peer_cred(sock)
    groups = _peer_groups(sock)
    pidfd = peer_pidfd(sock, pid)
    return Peer(
        uid=uid, gid=gid, pid=pid, groups=tuple(groups), pidfd=-1 if pidfd is None else pidfd
    )


# -- the owner ------------------------------------------------------------------


class Owner:
    """The process a lease belongs to: a pidfd (ours until :meth:`take`), its
    pid, and its start time, which with the pid names it across restarts.
    Each way of finding one is a constructor; each refuses a process that is
    gone, or that is not the peer's to name."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        start = identify(pidfd, pid)
        if start is None:
            os.close(pidfd)
            raise OwnerGone("the process the tap would belong to has exited")
        self.start = start

    @classmethod
    def of_peer(cls, peer: Peer) -> Owner:
        if peer.pidfd < 0:
            raise OwnerGone("the requesting process exited before its tap was made")
        return cls(peer.pid, os.dup(peer.pidfd))

    @classmethod
    def from_socket(cls, fd: int, peer: Peer) -> Owner:
        """The process at the other end of socket ``fd``: for the socket QEMU
        made with socketpair() and passed to its bridge helper, QEMU itself,
        however many shells stand between (QEMU runs a helper string through
        sh -c, and dash forks rather than execs).  It must be the peer's own."""
        refused = Denied("the fd sent with bridge-helper is not QEMU's helper socket")
        # Told from its /proc link first: any call on a FUSE file may wait for
        # its server (tapd.fdinfo).  Socket options are answered by the socket.
        if not fdinfo.is_socket(fd):
            raise refused
        try:
            sock = socket.socket(fileno=fd)  # borrowed: detached below, never closed here
        except OSError:
            raise refused from None
        try:
            if sock.family != socket.AF_UNIX:
                raise refused
            pid, uid, _ = peer_cred(sock)
            pidfd = peer_pidfd(sock, pid)
        except OSError:
            raise refused from None
        finally:
            sock.detach()
        if pidfd is None:
            raise OwnerGone("the VMM behind the helper socket is gone")
        if uid != peer.uid and peer.uid != 0:
            os.close(pidfd)
            raise Denied(
                f"the helper socket belongs to a process of uid {uid}, not to uid {peer.uid}"
            )
        return cls(pid, pidfd)

    @classmethod
    def parent_of(cls, peer: Peer) -> Owner:
        """The peer's parent, for bridge-helper without a socket: only a
        parent running as the peer's own uid (real and effective), or any
        for root.  Otherwise a helper started under someone else's process
        (a root daemon, another user's session) would give that process the
        lease, and the tap would outlive the requester."""
        found = parent(peer.pidfd, peer.pid) if peer.pidfd >= 0 else None
        if found is None:
            raise OwnerGone("the requesting process's parent (its VMM) is gone")
        pid, pidfd = found
        ids = uids(pid)
        if ids is None or exited(pidfd):
            os.close(pidfd)
            raise OwnerGone("the requesting process's parent (its VMM) is gone")
        if peer.uid != 0 and ids != (peer.uid, peer.uid):
            os.close(pidfd)
            raise Denied(
                f"bridge-helper without a socket makes the caller's parent the lease "
                f"owner, and the parent (pid {pid}) runs as uid {ids[1]} (real uid "
                f"{ids[0]}), not as uid {peer.uid}; run the helper from your own "
                "VMM, or send QEMU's helper socket with the request"
            )
        return cls(pid, pidfd)

    def take(self) -> int:
        pidfd, self.pidfd = self.pidfd, -1
        return pidfd

    def __enter__(self) -> Owner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def uids(pid: int) -> tuple[int, int] | None:
    """(real, effective) uid of ``pid`` from /proc/PID/status (proc(5)); the
    caller confirms with a pidfd that the pid was not reused meanwhile."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    real, effective = line.split()[1:3]
                    return int(real), int(effective)
    except (OSError, ValueError, IndexError):
        return None
    return None
