"""The one error tree of tapd.

Every error a client can see is a :class:`TapdError` subclass with a stable
kebab-case ``code`` (part of the wire contract: never rename one, only add) and
a message that says what to do about it.  The tree is split by whose fault it
is, the way trio separates ``ClosedResourceError`` from ``BrokenResourceError``:

* :class:`ClientError` - the request is wrong or not allowed; retrying the same
  request will fail the same way.
* :class:`SystemFault` - the host refused or broke (kernel error, bridge full);
  the request itself was fine.

:func:`to_wire` is the single place an exception becomes a reply.
"""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False  # typing costs a client ~2 ms to import; mypy reads this as usual
if TYPE_CHECKING:
    from typing import Any, ClassVar


class TapdError(Exception):
    """Base of every error tapd reports to a client."""

    code: ClassVar[str] = "internal-error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        #: what the audit log should say with it (never sent to the client)
        self.context: dict[str, Any] = {}

    def about(self, **context: Any) -> TapdError:
        """Add audit-log context (bridge, queues, the rule that decided)."""
        self.context.update(context)
        return self

    def to_wire(self) -> dict[str, Any]:
        return {"ok": False, "error": {"code": self.code, "message": self.message}}


# -- the client's fault --------------------------------------------------------


class ClientError(TapdError):
    """The request is malformed, invalid or not allowed."""

    code = "bad-request"


class ProtocolError(ClientError):
    """The bytes on the wire are not a valid request.  The only exception the
    protocol module raises."""

    code = "bad-request"


class LineTooLong(ProtocolError):
    code = "line-too-long"


class MalformedJson(ProtocolError):
    code = "malformed-json"


class NotAnObject(ProtocolError):
    code = "not-an-object"


class MissingOp(ProtocolError):
    code = "missing-op"


class UnknownOp(ProtocolError):
    code = "unknown-op"


class UnknownKey(ProtocolError):
    code = "unknown-key"


class InvalidValue(ProtocolError):
    code = "invalid-value"


class TooManyFds(ProtocolError):
    """More fds in one message than the kernel would deliver (MSG_CTRUNC)."""

    code = "too-many-fds"


class RequestTimeout(ClientError):
    code = "timeout"


class InvalidOptions(ProtocolError):
    """A combination of options QEMU itself would refuse."""

    code = "invalid-options"


class InvalidIfname(ClientError):
    code = "invalid-ifname"


class IfnameTaken(ClientError):
    code = "ifname-taken"


class BridgeNotFound(ClientError):
    code = "bridge-not-found"


class NotABridge(ClientError):
    code = "not-a-bridge"


class NotATap(ClientError):
    """An fd sent with fd=/fds= is not a usable tap queue."""

    code = "not-a-tap"


class Denied(ClientError):
    """Policy refused the request."""

    code = "denied"


class LeaseNotFound(ClientError):
    """No lease of yours by that id or name (another uid's leases are never
    acknowledged, not even by a different error)."""

    code = "lease-not-found"


class QuotaExceeded(Denied):
    """The requester already holds as many taps as its rule allows."""

    code = "quota-exceeded"


class GuestMacInUse(ClientError):
    """The guest MAC asked for belongs to a live lease already, or to the
    bridge (its own, a port's, or a learnt neighbour's address)."""

    code = "guest-mac-in-use"


class GuestIpsRequired(ClientError):
    """The allow rule filters addresses, and the request named none."""

    code = "guest-ips-required"


class GuestIpInUse(ClientError):
    """An address in guest_ips belongs to a live lease already."""

    code = "guest-ip-in-use"


class NotApplicable(ClientError):
    """A key that is valid for another op but cannot apply to this one (e.g.
    ``fd=`` with ``prepare``: a VMM that opens its tap by name has no fd)."""

    code = "option-not-applicable"


class Unsupported(ClientError):
    """A valid option this version of tapd does not implement yet."""

    code = "unsupported"


# -- the system's fault --------------------------------------------------------


class SystemFault(TapdError):
    """The request was fine; the host could not carry it out."""

    code = "system-error"


class KernelError(SystemFault):
    """A syscall failed.  ``errno`` keeps the kernel's answer for the log."""

    code = "kernel-error"

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.errno = err


class KernelPermission(KernelError):
    code = "kernel-permission-denied"


class BridgeFull(KernelError):
    code = "bridge-full"


class TunUnavailable(KernelError):
    code = "tun-unavailable"


class TapIntruded(SystemFault):
    """Another process attached a queue to every multi-queue tap tapd made for
    the request, in the instant before it had an owner; tapd removed them."""

    code = "tap-intruded"


class VhostUnavailable(SystemFault):
    """vhostforce=on, and the vhost-net device could not be opened."""

    code = "vhost-unavailable"


class HookFailed(SystemFault):
    """The administrator's network script failed."""

    code = "script-failed"


class HelperFailed(SystemFault):
    """The administrator's bridge helper failed."""

    code = "helper-failed"


class Overloaded(SystemFault):
    code = "overloaded"


class ConfigInvalid(SystemFault):
    """tapd was started with a configuration it cannot use, and serves nothing
    until the administrator fixes the file and reloads it."""

    code = "config-invalid"


class FdsRefused(SystemFault):
    """tapd cannot take fds now: its closers are stuck on fds someone sent
    (see tapd.closer), so fds that arrive could not be let go of."""

    code = "fds-refused"


class InternalError(SystemFault):
    code = "internal-error"


def kernel_error(exc: OSError, doing: str) -> KernelError:
    """Turn a failed syscall into a :class:`KernelError` a human can act on.

    ``doing`` says what tapd was trying, in the form "attaching tap0 to br0".
    """
    err = exc.errno or 0
    reason = os.strerror(err) if err else str(exc)
    if err in (errno.EPERM, errno.EACCES):
        return KernelPermission(
            f"the kernel refused {doing}: {reason}; tapd needs CAP_NET_ADMIN "
            "and access to /dev/net/tun",
            err,
        )
    if err == errno.EXFULL:
        # net/bridge/br_if.c: find_portno() hands out port numbers from a
        # BR_MAX_PORTS (1024) bitmap whose bit 0 is reserved.
        return BridgeFull(
            f"the kernel refused {doing}: the bridge already has the most ports "
            "a Linux bridge takes (1023); use another bridge",
            err,
        )
    return KernelError(f"the kernel refused {doing}: {reason}", err)


def to_wire(exc: BaseException) -> dict[str, Any]:
    """The reply for any exception: tapd's own carry their code, anything
    else is an internal error whose details stay in the log."""
    if isinstance(exc, TapdError):
        return exc.to_wire()
    return InternalError(
        "tapd hit an internal error; the request was not carried out "
        "(details are in the daemon's log)"
    ).to_wire()
