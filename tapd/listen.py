"""Where the daemon's listening socket comes from.

Three ways, in this order of precedence:

1. ``--listen-fd N``: a listening socket the parent opened and left open
   (as QEMU's chardev ``fd=`` takes one, so the parent can connect at once
   without retrying until the daemon is up);
2. systemd socket activation: ``LISTEN_PID`` names us and ``LISTEN_FDS`` >= 1,
   the socket is fd 3 (sd_listen_fds(3));
3. a path in a directory only root can write: bound in a private directory
   of its own next to it, given its mode and group there, and only then
   renamed into place, so the socket never exists with the wrong permissions,
   a stale socket file is replaced atomically, and nobody can swap a symlink
   in for tapd's chmod and chown to follow.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
import tempfile
from dataclasses import dataclass

#: sd_listen_fds(3): the first passed fd
SD_LISTEN_FDS_START = 3
#: <linux/un.h>: sun_path is 108 bytes including the NUL
SUN_PATH_MAX = 107


class ListenError(Exception):
    """The daemon cannot listen; the message says why and what to do."""


@dataclass
class Listener:
    sock: socket.socket
    source: str  # "path", "listen-fd" or "systemd"
    path: str | None = None  # the socket file we created, to remove on exit
    inode: int | None = None

    def cleanup(self) -> None:
        """Remove our socket file, unless something else has replaced it."""
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self.inode:
                os.unlink(self.path)


def _adopt(fd: int, what: str) -> socket.socket:
    """Wrap an inherited fd, checking that it is a listening UNIX stream socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ListenError(f"{what} is not a socket: {exc.strerror}") from None
    _check_listening_unix(sock, what)
    os.set_inheritable(fd, False)
    return sock


def _check_listening_unix(sock: socket.socket, what: str) -> None:
    try:
        family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        raise ListenError(f"{what} is not a socket: {exc.strerror}") from None
    if family != socket.AF_UNIX or kind != socket.SOCK_STREAM:
        raise ListenError(f"{what} is not a UNIX stream socket")
    if not listening:
        raise ListenError(f"{what} is not listening; call listen() on it before passing it")


def from_fd(fd: int) -> Listener:
    try:
        os.fstat(fd)
    except OSError:
        raise ListenError(f"--listen-fd {fd}: no such open file descriptor") from None
    return Listener(sock=_adopt(fd, f"--listen-fd {fd}"), source="listen-fd")


def from_systemd(environ: dict[str, str] | None = None) -> Listener | None:
    """The socket systemd passed us, or None if we were not socket-activated."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    # sd_listen_fds(unset_environment=1): our children must not think it is theirs.
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    if count < 1:
        return None
    if count > 1:
        raise ListenError(
            f"systemd passed {count} sockets; tapd.socket should have exactly one ListenStream="
        )
    return Listener(sock=_adopt(SD_LISTEN_FDS_START, "the socket systemd passed"), source="systemd")


def _gid(group: str) -> int:
    if group.isascii() and group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ListenError(f"socket_group {group!r}: no such group") from None


def _refuse_if_live(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return  # stale: nobody listens there any more
        raise ListenError(f"cannot tell whether {path} is in use: {exc.strerror}") from None
    else:
        raise ListenError(f"another process is already serving {path}; stop it first")
    finally:
        probe.close()


def directory_problem(mode: int, uid: int, euid: int, *, holds_socket: bool) -> str | None:
    """Why a directory with this ``stat`` mode and owner may not hold tapd's
    socket (``holds_socket``) or be above the one that does, or None.

    Whoever can write a directory can rename tapd's socket (or a directory
    on its path) away and put a symlink or a socket of their own in its
    place; its owner can always make it writable.  A sticky directory (/tmp)
    lets others add entries but not rename root's (fs/namei.c: may_delete(),
    check_sticky()), so it may be above the socket's directory, not be it: there
    anyone could bind a socket at the path before tapd does.
    """
    if uid not in (0, euid):
        return f"it belongs to uid {uid}"
    writable = mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and (holds_socket or not mode & stat.S_ISVTX):
        return f"it is writable by its group or by everyone (mode {stat.S_IMODE(mode):04o})"
    return None


def _trusted_directory(path: str) -> str:
    """The real directory ``path`` is in, once it and every directory above
    it are root's alone (see :func:`directory_problem`)."""
    directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    euid = os.geteuid()
    step = directory
    while True:
        try:
            st = os.stat(step)
        except OSError as exc:
            raise ListenError(f"cannot use {path}: {step}: {exc.strerror}") from None
        problem = directory_problem(st.st_mode, st.st_uid, euid, holds_socket=step == directory)
        if problem:
            raise ListenError(
                f"refusing to listen on {path}: {step} is not root's alone ({problem}), "
                "so another user could replace the socket or turn tapd's chmod onto "
                "another file; put the socket in a directory only root can write, "
                "such as /run"
            )
        if step == "/":
            return directory
        step = os.path.dirname(step)


def at_path(path: str, mode: int = 0o660, group: str | None = None, backlog: int = 512) -> Listener:
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ListenError(f"socket path {path!r} is longer than {SUN_PATH_MAX} bytes")
    name = os.path.basename(path)
    if not name:
        raise ListenError(f"socket path {path!r} names a directory, not a socket")
    target = os.path.join(_trusted_directory(path), name)
    _refuse_if_live(target)
    gid = _gid(group) if group is not None else -1
    # Made 0700 by mkdtemp, in a directory only root writes: nobody else can
    # reach the socket until it is renamed into place, with its mode and group.
    try:
        private = tempfile.mkdtemp(prefix=".tapd-", dir=os.path.dirname(target))
    except OSError as exc:
        raise ListenError(f"cannot listen on {path}: {exc.strerror}") from None
    tmp = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if len(os.fsencode(tmp)) > SUN_PATH_MAX:
            raise ListenError(
                f"the socket's temporary path {tmp!r} is longer than {SUN_PATH_MAX} bytes; "
                "use a shorter directory"
            )
        sock.bind(tmp)
        os.chmod(tmp, mode)
        if gid != -1:
            os.chown(tmp, -1, gid)
        sock.listen(backlog)
        os.rename(tmp, target)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            os.rmdir(private)
    return Listener(sock=sock, source="path", path=target, inode=os.lstat(target).st_ino)
