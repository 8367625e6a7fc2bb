"""One call to tapd without I/O: what the sync client (:mod:`tapd.client`) and
the async one (:mod:`tapd.aio`) share.

An :class:`Exchange` is one request line out and one reply line back, as h11
is a connection: the I/O layer sends :attr:`Exchange.line` with its fds, then
feeds it what each ``recvmsg`` returned until it says the reply is complete;
the exchange checks the reply and turns it into a result or an error.  The
two clients therefore cannot differ in what they accept, and the framing
they use is the daemon's own (:mod:`tapd.wire`, :mod:`tapd.scm`).

Errors: everything a client raises is a :class:`CallError` with a ``code``
and a ``message``.  A :class:`DaemonError` carries one of the daemon's wire
codes (the README's error table); a :class:`LocalError` is a failure on this
side of the socket (tapd unreachable, no answer in time, a reply that cannot
be read), with a code of its own that no daemon sends.  (:class:`ClientError`
is CallError's first name, kept for callers; it is not the daemon's
:class:`tapd.errors.ClientError`, "the client's fault".)

Standard library only: a VMM started per VM imports this before its first
byte reaches tapd.
"""

from __future__ import annotations

import errno
import os
import stat

from . import scm, wire
from .errors import ProtocolError

TYPE_CHECKING = False  # typing costs a client ~2 ms to import; mypy reads this as usual
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any, ClassVar

#: the environment variable naming tapd's socket
ENV_SOCKET = "TAPD_SOCKET"

#: The longest reply line a client reads.  Replies are tapd's own and small,
#: except a root ``list`` of thousands of leases; a bound still keeps a
#: stranger on the socket from making a client buffer without end.
REPLY_LIMIT = 1 << 20


#: The system-wide client setting, for clients started where no environment
#: reaches them (libvirt runs its bridge helper with a cleaned environment).
#: Lines of ``key = value``; ``#`` starts a comment; the one key today is
#: ``socket``, and keys this version does not know are ignored.
CLIENT_CONFIG = "/etc/tapd/client.conf"


def configured_socket(path: str | None = None) -> str | None:
    """The ``socket`` that ``path`` (default :data:`CLIENT_CONFIG`) names, or
    None (no file, or no key).  Read with os.open/os.read: a missing file
    costs one failed syscall on every client's start."""
    try:
        fd = os.open(path or CLIENT_CONFIG, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, 65536).decode("utf-8", "replace")
    finally:
        os.close(fd)
    found = None
    for line in text.splitlines():
        key, sep, value = line.partition("#")[0].partition("=")
        if sep and key.strip() == "socket" and value.strip():
            found = value.strip().strip('"')
    return found


def socket_path(explicit: str | None = None) -> str:
    """--socket, else $TAPD_SOCKET, else /etc/tapd/client.conf's ``socket``,
    else /run/tapd.sock."""
    return explicit or os.environ.get(ENV_SOCKET) or configured_socket() or wire.DEFAULT_SOCKET


# -- errors --------------------------------------------------------------------------


class CallError(Exception):
    """Anything a tapd client raises: ``code`` (stable, kebab-case) and a
    ``message`` that says what to do about it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message


#: CallError's first name, kept for the callers that catch it (a public name
#: of tapd.client and tapd.aio)
ClientError = CallError


class DaemonError(CallError):
    """tapd answered with an error: ``code`` is one of its wire codes."""


class LocalError(CallError):
    """The call failed on the client's side of the socket.  Each subclass has
    a code of its own that is never one of the daemon's wire codes.  Abstract,
    as the daemon's bases are: with no ``CODE`` of its own it cannot be made."""

    #: the stable code; a class without one is abstract
    CODE: ClassVar[str]

    def __init__(self, message: str) -> None:
        if not hasattr(self, "CODE"):
            raise TypeError(f"{type(self).__name__} is abstract; raise one of its subclasses")
        super().__init__(self.CODE, message)


class Unreachable(LocalError):
    """No tapd listens at the socket, or this user may not connect to it."""

    CODE = "unreachable"


class Timeout(LocalError):
    """tapd did not take the connection, or did not answer, in time.  (The
    daemon's own ``timeout`` is its refusal of a request sent too slowly.)"""

    CODE = "client-timeout"


class SendFailed(LocalError):
    """The request could not be sent: most often an fd the caller named to
    send along is not open."""

    CODE = "send-failed"


class Disconnected(LocalError):
    """tapd closed the connection before its reply was complete."""

    CODE = "disconnected"


class BadReply(LocalError):
    """The reply is not a tapd reply (not JSON, too long, fds that do not
    add up)."""

    CODE = "bad-reply"


class ReplyFdsDropped(LocalError):
    """The kernel dropped fds of the reply for lack of room (``MSG_CTRUNC``);
    those that came are closed, since which ones are missing is unknown."""

    CODE = "reply-fds-dropped"


def connect_failed(where: str, exc: OSError) -> LocalError:
    """The error for a ``connect()`` to ``where`` that failed with ``exc``."""
    if isinstance(exc, BlockingIOError):
        # net/unix/af_unix.c unix_stream_connect(): EAGAIN once the listener's
        # backlog is full and the send timeout (or O_NONBLOCK) says not to wait.
        return Timeout(f"tapd at {where} did not take the connection in time (busy?)")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Unreachable(
            f"this user may not connect to tapd at {where} ({exc.strerror}): "
            f"{_who_may(where)}; ask the administrator to add you to its group"
        )
    return Unreachable(
        f"cannot connect to tapd at {where}: {exc.strerror or exc}; is tapd "
        f"running? (set --socket or ${ENV_SOCKET} if it listens elsewhere)"
    )


def _who_may(where: str) -> str:
    """Who may connect to the socket at ``where``, as far as this user can see."""
    try:
        st = os.stat(where)
    except OSError:
        return "the socket or a directory above it is closed to this user"
    import grp  # only on this path: the clients' start stays lean

    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"the socket is mode {stat.S_IMODE(st.st_mode):04o}, group {group}"


def send_failed(exc: OSError) -> SendFailed:
    return SendFailed(
        f"could not send the request: {exc.strerror or exc} (are the fds named to send open?)"
    )


def no_answer(where: str) -> Timeout:
    return Timeout(f"tapd at {where} did not answer in time")


def check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout > 0:  # NaN too
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout}")


# -- one exchange ----------------------------------------------------------------------

#: what a closed connection gives recvmsg
EOF = scm.Received(b"", [], False)


class Exchange:
    """One request and its reply.  ``line`` and ``fds`` are what to send (the
    fds stay the caller's); :meth:`receive` takes each ``recvmsg``'s worth;
    :meth:`result` hands over the reply and its fds.  Whatever was received
    and not handed over is closed by :meth:`close`."""

    def __init__(self, request: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
        self.line = wire.dumps_line(request)
        self.fds = fds
        self._lines = wire.LineBuffer(limit=REPLY_LIMIT)
        self._received: list[int] = []
        self._reply: dict[str, Any] | None = None

    def receive(self, chunk: scm.Received) -> bool:
        """Take one ``recvmsg``'s worth; True once the reply is complete.
        Raises :class:`DaemonError` for an error reply, a :class:`LocalError`
        when the reply cannot be had."""
        self._received.extend(chunk.fds)
        if chunk.truncated:
            raise ReplyFdsDropped("the reply's fds did not fit; none were kept")
        if not chunk.data:
            raise Disconnected("tapd closed the connection without a reply")
        self._lines.feed(chunk.data)
        try:
            line = self._lines.next_line()
            if line is None:
                return False
            reply = wire.decode_reply(line)
        except ProtocolError as exc:
            raise BadReply(f"tapd sent an unreadable reply: {exc}") from None
        if not reply["ok"]:
            error = reply.get("error")
            if not isinstance(error, dict):
                error = {}
            raise DaemonError(
                str(error.get("code", "unknown")), str(error.get("message", "request failed"))
            )
        self._reply = reply
        return True

    def result(self) -> tuple[dict[str, Any], list[int]]:
        """The reply and its fds, which the caller now owns."""
        assert self._reply is not None, "result() before the reply was complete"
        fds, self._received = self._received, []
        return self._reply, fds

    def close(self) -> None:
        scm.close_all(self._received)
        self._received = []


# -- what each call sends, and makes of its reply -----------------------------------------


def prepare_request(options: Mapping[str, Any]) -> dict[str, Any]:
    """A ``prepare`` request from its keyword arguments; None values left out."""
    body: dict[str, Any] = {"op": "prepare"}
    body.update((key, value) for key, value in options.items() if value is not None)
    return body


class TapGrant:
    """A granted request: the reply and the fds, tap queues first.  Close it
    (or use it as a context manager) once the VMM has its own copies."""

    __slots__ = ("reply", "tap_fds", "vhost_fds")

    def __init__(
        self, reply: dict[str, Any], tap_fds: list[int], vhost_fds: list[int] | None = None
    ) -> None:
        self.reply = reply
        self.tap_fds = tap_fds
        self.vhost_fds = [] if vhost_fds is None else vhost_fds

    def __repr__(self) -> str:
        return f"TapGrant(reply={self.reply!r}, tap_fds={self.tap_fds}, vhost_fds={self.vhost_fds})"

    @property
    def ifname(self) -> str:
        return str(self.reply["ifname"])

    @property
    def guest_mac(self) -> str | None:
        """The MAC the guest's NIC must use (a filtered port passes no other)."""
        mac = self.reply.get("guest_mac")
        return None if mac is None else str(mac)

    def netdev_args(self) -> str:
        """The fd part of a QEMU ``-netdev tap,...`` argument."""
        if len(self.tap_fds) == 1 and not self.vhost_fds:
            return f"fd={self.tap_fds[0]}"
        args = "fds=" + ":".join(map(str, self.tap_fds))
        if self.vhost_fds:
            args += ",vhost=on,vhostfds=" + ":".join(map(str, self.vhost_fds))
        return args

    def close(self) -> None:
        scm.close_all(self.tap_fds + self.vhost_fds)
        self.tap_fds, self.vhost_fds = [], []

    def __enter__(self) -> TapGrant:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def tap_request(options: Mapping[str, Any]) -> dict[str, Any]:
    """A ``request`` from QEMU's ``-netdev tap`` keys (``poll_us`` for
    ``poll-us``); None values are left out."""
    body: dict[str, Any] = {"op": "request"}
    for key, value in options.items():
        if value is not None:
            body["poll-us" if key == "poll_us" else key] = value
    return body


def tap_grant(reply: dict[str, Any], fds: list[int]) -> TapGrant:
    """The grant a ``request`` reply and its fds make; the fds are closed if
    they are not the ones the reply announces."""
    try:
        ntap, nvhost = int(reply.get("fds", 0)), int(reply.get("vhostfds", 0))
    except (TypeError, ValueError):
        ntap, nvhost = -1, 0
    if len(fds) != ntap + nvhost or ntap < 0 or nvhost < 0:
        scm.close_all(fds)
        raise BadReply(
            f"tapd promised {reply.get('fds')} + {reply.get('vhostfds', 0)} fds "
            f"but {len(fds)} arrived"
        )
    return TapGrant(reply=reply, tap_fds=fds[:ntap], vhost_fds=fds[ntap:])


def helper_request(br: str | None, vnet_hdr: bool | None) -> dict[str, Any]:
    body: dict[str, Any] = {"op": "bridge-helper"}
    if br is not None:
        body["br"] = br
    if vnet_hdr is not None:
        body["vnet_hdr"] = vnet_hdr
    return body


def helper_grant(reply: dict[str, Any], fds: list[int]) -> TapGrant:
    if len(fds) != 1:
        scm.close_all(fds)
        raise BadReply(f"tapd sent {len(fds)} fds for a helper request")
    return TapGrant(reply=reply, tap_fds=fds)


def leases_of(reply: dict[str, Any]) -> list[dict[str, Any]]:
    leases = reply.get("leases")
    if not isinstance(leases, list):
        raise BadReply('tapd\'s "list" reply has no list of leases')
    return leases


def lease_of(reply: dict[str, Any]) -> dict[str, Any]:
    lease = reply.get("lease")
    if not isinstance(lease, dict):
        raise BadReply('tapd\'s "release" reply names no lease')
    return lease
