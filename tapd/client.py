"""A small synchronous client for tapd: what ``tapctl`` uses, and what a
Python VMM manager imports.

    grant = request_tap(br="br0")
    subprocess.run(["qemu-system-x86_64", ..., "-netdev", f"tap,id=n0,{grant.netdev_args()}"],
                   pass_fds=grant.tap_fds)
    grant.close()
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import fdpass, protocol
from .config import DEFAULT_SOCKET
from .errors import ProtocolError
from .tun import close_all

ENV_SOCKET = "TAPD_SOCKET"

#: The system-wide client setting, for clients started where no environment
#: reaches them (libvirt runs its bridge helper with a cleaned environment).
#: Lines of ``key = value``; ``#`` starts a comment; the one key today is
#: ``socket``, and keys this version does not know are ignored.
CLIENT_CONFIG = "/etc/tapd/client.conf"


def configured_socket(path: str | None = None) -> str | None:
    """The ``socket`` that ``path`` (default :data:`CLIENT_CONFIG`) names, or
    None (no file, or no key)."""
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
    return explicit or os.environ.get(ENV_SOCKET) or configured_socket() or DEFAULT_SOCKET


class ClientError(Exception):
    """tapd answered with an error, or could not be reached.  ``code`` is the
    daemon's stable error code (or a client-side one such as ``unreachable``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message


def call(
    request: dict[str, Any],
    *,
    path: str | None = None,
    fds: Sequence[int] = (),
    timeout: float | None = 60.0,
) -> tuple[dict[str, Any], list[int]]:
    """Send one request; return the reply and the fds that came with it.

    Raises :class:`ClientError` for an error reply.  The caller owns the
    returned fds.
    """
    where = socket_path(path)
    if timeout is not None and not timeout > 0:  # NaN too
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    received: list[int] = []
    try:
        if timeout is not None:
            # Timeouts kept by the kernel (SO_SNDTIMEO also bounds a UNIX
            # connect): settimeout() would poll() before every call instead.
            # (A signal handler that runs makes the kernel start the wait
            # over: PEP 475 retries the call.)
            seconds = max(timeout, 1e-6)  # a zero timeval means "wait forever"
            timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        try:
            sock.connect(where)
        except BlockingIOError:
            raise ClientError(
                "timeout", f"tapd at {where} did not take the connection in time (busy?)"
            ) from None
        except OSError as exc:
            raise ClientError(
                "unreachable",
                f"cannot connect to tapd at {where}: {exc.strerror or exc}; is tapd "
                f"running? (set --socket or ${ENV_SOCKET} if it listens elsewhere)",
            ) from None
        fdpass.send_line_sync(sock, protocol.encode(request), fds)
        lines = protocol.LineBuffer(limit=1 << 20)
        line = None
        while line is None:
            try:
                chunk = fdpass.recv_sync(sock)
            except ConnectionResetError:
                raise ClientError(
                    "disconnected", "tapd closed the connection without a reply"
                ) from None
            received.extend(chunk.fds)
            if chunk.truncated:
                raise ClientError("too-many-fds", "the reply's fds did not fit; none were kept")
            if not chunk.data:
                raise ClientError("disconnected", "tapd closed the connection without a reply")
            lines.feed(chunk.data)
            line = lines.next_line()
        try:
            reply = protocol.decode_reply(line)
        except ProtocolError as exc:
            raise ClientError("bad-reply", f"tapd sent an unreadable reply: {exc}") from None
        if not reply["ok"]:
            error = reply.get("error") or {}
            raise ClientError(
                str(error.get("code", "unknown")), str(error.get("message", "request failed"))
            )
        result = received
        received = []
        return reply, result
    except BlockingIOError:  # EAGAIN: SO_SNDTIMEO or SO_RCVTIMEO ran out
        raise ClientError("timeout", f"tapd at {where} did not answer in time") from None
    finally:
        close_all(received)
        sock.close()


@dataclass
class TapGrant:
    """A granted request: the reply and the fds, tap queues first."""

    reply: dict[str, Any]
    tap_fds: list[int]
    vhost_fds: list[int] = field(default_factory=list)

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
        close_all(self.tap_fds + self.vhost_fds)
        self.tap_fds, self.vhost_fds = [], []


def request_tap(
    *, path: str | None = None, send_fds: Sequence[int] = (), **options: Any
) -> TapGrant:
    """Ask for a tap.  ``options`` are QEMU's ``-netdev tap`` keys (use
    ``poll_us`` for ``poll-us``); None values are left out.  With ``fd=`` or
    ``fds=``, ``send_fds`` are the tap fds to attach, in the order named."""
    body: dict[str, Any] = {"op": "request"}
    for key, value in options.items():
        if value is not None:
            body["poll-us" if key == "poll_us" else key] = value
    reply, fds = call(body, path=path, fds=send_fds)
    ntap, nvhost = int(reply.get("fds", 0)), int(reply.get("vhostfds", 0))
    if len(fds) != ntap + nvhost:
        close_all(fds)
        raise ClientError("bad-reply", f"tapd promised {ntap + nvhost} fds but {len(fds)} arrived")
    return TapGrant(reply=reply, tap_fds=fds[:ntap], vhost_fds=fds[ntap:])


def prepare_tap(*, path: str | None = None, **options: Any) -> dict[str, Any]:
    """Ask for a persistent tap that the VMM opens itself by name (the
    ``prepare`` op): ``br``, and optionally ``ifname``, ``queues``,
    ``vnet_hdr``, ``script``, ``downscript``.  The lease belongs to the
    calling process: the tap is removed when it exits, so exec the VMM from
    it (as ``tapctl prepare -- CMD`` does).  Returns the reply."""
    body: dict[str, Any] = {"op": "prepare"}
    body.update((key, value) for key, value in options.items() if value is not None)
    return _simple(body, path)


def _simple(request: dict[str, Any], path: str | None) -> dict[str, Any]:
    reply, fds = call(request, path=path)
    close_all(fds)
    return reply


def hello(*, path: str | None = None) -> dict[str, Any]:
    return _simple({"op": "hello"}, path)


def leases(*, path: str | None = None) -> list[dict[str, Any]]:
    """Your leases (root: every lease)."""
    return list(_simple({"op": "list"}, path)["leases"])


def release(lease: str, *, path: str | None = None) -> dict[str, Any]:
    """End one of your leases by id or ifname: its tap is removed at once."""
    return dict(_simple({"op": "release", "lease": lease}, path)["lease"])


def status(*, path: str | None = None) -> dict[str, Any]:
    return _simple({"op": "status"}, path)


def bridge_helper(
    br: str | None, vnet_hdr: bool | None, vmm_socket: int | None = None, *, path: str | None = None
) -> TapGrant:
    """A tap for the QEMU that ran this helper (QEMU's helper protocol).
    ``vmm_socket`` is the socket QEMU passed as --fd: it names QEMU to tapd."""
    body: dict[str, Any] = {"op": "bridge-helper", "br": br, "vnet_hdr": vnet_hdr}
    reply, fds = call(
        {k: v for k, v in body.items() if v is not None},
        path=path,
        fds=[] if vmm_socket is None else [vmm_socket],
    )
    if len(fds) != 1:
        close_all(fds)
        raise ClientError("bad-reply", f"tapd sent {len(fds)} fds for a helper request")
    return TapGrant(reply=reply, tap_fds=fds)
