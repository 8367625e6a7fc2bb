"""A small synchronous client for tapd: what ``tapctl`` uses, and what a
Python VMM manager imports.

    grant = request_tap(br="br0")
    subprocess.run(["qemu-system-x86_64", ..., "-netdev", f"tap,id=n0,{grant.netdev_args()}"],
                   pass_fds=grant.tap_fds)
    grant.close()

Standard library only (a process started per VM pays for every import before
its first byte reaches tapd); :mod:`tapd.aio` is the same calls for asyncio
and trio.  Errors are :class:`CallError` (also named :class:`ClientError`, its
first name): :class:`DaemonError` with the daemon's code, or a
:class:`LocalError` subclass for a failure on this side.
"""

from __future__ import annotations

import _socket
import struct

from . import scm
from .exchange import (
    ENV_SOCKET,
    EOF,
    BadReply,
    CallError,
    ClientError,
    DaemonError,
    Disconnected,
    Exchange,
    LocalError,
    ReplyFdsDropped,
    SendFailed,
    TapGrant,
    Timeout,
    Unreachable,
    check_timeout,
    connect_failed,
    helper_grant,
    helper_request,
    lease_of,
    leases_of,
    no_answer,
    prepare_request,
    send_failed,
    socket_path,
    tap_grant,
    tap_request,
)

TYPE_CHECKING = False  # typing costs a client ~2 ms to import; mypy reads this as usual
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

__all__ = [
    "ENV_SOCKET",
    "BadReply",
    "CallError",
    "ClientError",
    "DaemonError",
    "Disconnected",
    "LocalError",
    "ReplyFdsDropped",
    "SendFailed",
    "TapGrant",
    "Timeout",
    "Unreachable",
    "bridge_helper",
    "call",
    "hello",
    "leases",
    "prepare_tap",
    "release",
    "request_tap",
    "socket_path",
    "status",
]


def call(
    request: dict[str, Any],
    *,
    path: str | None = None,
    fds: Sequence[int] = (),
    timeout: float | None = 60.0,
) -> tuple[dict[str, Any], list[int]]:
    """Send one request; return the reply and the fds that came with it.

    Raises :class:`CallError`.  The caller owns the returned fds.
    ``timeout`` bounds each wait (the connection, each send, each receive).
    """
    where = socket_path(path)
    check_timeout(timeout)
    exchange = Exchange(request, fds)
    # _socket: the C module socket.py wraps (see tapd.scm for why).
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        if timeout is not None:
            # Timeouts kept by the kernel (SO_SNDTIMEO also bounds a UNIX
            # connect): settimeout() would poll() before every call instead.
            # (A signal handler that runs makes the kernel start the wait
            # over: PEP 475 retries the call.)
            seconds = max(timeout, 1e-6)  # a zero timeval means "wait forever"
            timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, timeval)
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, timeval)
        try:
            sock.connect(where)
        except OSError as exc:
            raise connect_failed(where, exc) from None
        try:
            scm.send_line_sync(sock, exchange.line, exchange.fds)
        except (BrokenPipeError, ConnectionResetError):
            pass  # tapd may have answered before it closed (overloaded): read on
        except BlockingIOError:
            raise  # SO_SNDTIMEO: below
        except OSError as exc:
            raise send_failed(exc) from None
        while True:
            try:
                chunk = scm.recv_sync(sock)
            except ConnectionResetError:
                chunk = EOF
            if exchange.receive(chunk):
                return exchange.result()
    except BlockingIOError:  # EAGAIN: SO_SNDTIMEO or SO_RCVTIMEO ran out
        raise no_answer(where) from None
    finally:
        exchange.close()
        sock.close()


def request_tap(
    *,
    path: str | None = None,
    send_fds: Sequence[int] = (),
    timeout: float | None = 60.0,
    **options: Any,
) -> TapGrant:
    """Ask for a tap.  ``options`` are QEMU's ``-netdev tap`` keys (use
    ``poll_us`` for ``poll-us``) and tapd's own (``guest_mac``, ``guest_ips``,
    ``vlan``: the access VLAN, one the rule permits); None values are left out.  With ``fd=`` or
    ``fds=``, ``send_fds`` are the tap fds to attach, in the order named."""
    return tap_grant(*call(tap_request(options), path=path, fds=send_fds, timeout=timeout))


def prepare_tap(
    *, path: str | None = None, timeout: float | None = 60.0, **options: Any
) -> dict[str, Any]:
    """Ask for a persistent tap that the VMM opens itself by name (the
    ``prepare`` op): ``br``, and optionally ``ifname``, ``queues``,
    ``vnet_hdr``, ``script``, ``downscript``, ``guest_mac``, ``guest_ips``, ``vlan``.
    The lease belongs to the calling process: the tap is removed when it
    exits, so exec the VMM from it (as ``tapctl prepare -- CMD`` does).
    Returns the reply."""
    return _simple(prepare_request(options), path, timeout)


def _simple(request: dict[str, Any], path: str | None, timeout: float | None) -> dict[str, Any]:
    reply, fds = call(request, path=path, timeout=timeout)
    scm.close_all(fds)
    return reply


def hello(*, path: str | None = None, timeout: float | None = 60.0) -> dict[str, Any]:
    """The daemon's protocol, version and ops."""
    return _simple({"op": "hello"}, path, timeout)


def leases(*, path: str | None = None, timeout: float | None = 60.0) -> list[dict[str, Any]]:
    """Your leases (root: every lease)."""
    return leases_of(_simple({"op": "list"}, path, timeout))


def release(lease: str, *, path: str | None = None, timeout: float | None = 60.0) -> dict[str, Any]:
    """End one of your leases by id or ifname: its tap is removed at once."""
    return lease_of(_simple({"op": "release", "lease": lease}, path, timeout))


def status(*, path: str | None = None, timeout: float | None = 60.0) -> dict[str, Any]:
    """The daemon's version, uptime, lease and connection counts, and its
    config file (the key is absent on the built-in defaults)."""
    return _simple({"op": "status"}, path, timeout)


def bridge_helper(
    br: str | None,
    vnet_hdr: bool | None,
    vmm_socket: int | None = None,
    *,
    path: str | None = None,
    timeout: float | None = 60.0,
) -> TapGrant:
    """A tap for the QEMU that ran this helper (QEMU's helper protocol).
    ``vmm_socket`` is the socket QEMU passed as --fd: it names QEMU to tapd."""
    fds = [] if vmm_socket is None else [vmm_socket]
    return helper_grant(*call(helper_request(br, vnet_hdr), path=path, fds=fds, timeout=timeout))
