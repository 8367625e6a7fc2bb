"""The one error tree of tapd.

Every error a client can see is a :class:`TapdError` subclass with a stable
kebab-case ``code`` (part of the wire contract: never rename one, only add) and
a message that says what to do about it.  The tree is split by whose fault it
is, the way trio separates ``ClosedResourceError`` from ``BrokenResourceError``:

* :class:`ClientError` - the request is wrong, not allowed, or at odds with
  what exists (a name taken, a tap leased, a requester that has exited); the
  host is fine, and the same request fails the same way until the client
  changes it or what it ran into.
* :class:`SystemFault` - the host refused or broke (kernel error, bridge full);
  the request itself was fine.

:class:`TapdError`, :class:`ClientError`, :class:`ProtocolError` and
:class:`SystemFault` are abstract: they have no ``code``, and making one raises
``TypeError`` (as h11's bare ``ProtocolError`` cannot be made), so no reply
ever carries a code the README's table does not list.  Every concrete class
has a code of its own.

:func:`to_wire` is the single place an exception becomes a reply, and
:meth:`TapdError.about` the single way to add what the log says with one.
"""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False  # typing costs a client ~2 ms to import; mypy reads this as usual
if TYPE_CHECKING:
    from typing import Any, ClassVar, Self


class TapdError(Exception):
    """Base of every error tapd reports to a client.  Abstract."""

    #: the stable wire code; a class without one is abstract
    code: ClassVar[str]

    def __init__(self, message: str) -> None:
        if not hasattr(self, "code"):
            raise TypeError(
                f"{type(self).__name__} is an abstract error with no wire code; "
                "raise one of its subclasses"
            )
        super().__init__(message)
        self.message = message
        #: what the audit log says with it (never sent to the client); read
        #: it here, add to it with :meth:`about`
        self.context: dict[str, Any] = {}

    def about(self, **context: Any) -> Self:
        """Add what the audit log says with this error (the rule that
        decided, the bridge, the queues).  A key given already stays: the
        code nearest the raise knows best."""
        for key, value in context.items():
            self.context.setdefault(key, value)
        return self


# -- the client's fault --------------------------------------------------------


class ClientError(TapdError):
    """The client's fault: the request is malformed, invalid, not allowed, or
    at odds with what exists.  Abstract."""


class ProtocolError(ClientError):
    """A line, or the fds sent with it, that the framing or the request
    models refuse before any op runs.  :mod:`tapd.wire` and
    :mod:`tapd.protocol` raise these and nothing else (a test fuzzes that); the
    server raises :class:`TooManyFds`.  Abstract."""


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
    """More fds than tapd takes: a message whose fds the kernel had to drop
    (``MSG_CTRUNC``), more than one request may bring, or more waiting in
    tapd than the uid (or all clients together) may have."""

    code = "too-many-fds"


class RequestTimeout(ClientError):
    """No complete request within ``request_timeout``, a reply the client
    did not take within it, or a connection open past its lifetime."""

    code = "timeout"


class InvalidOptions(ClientError):
    """A combination of options QEMU itself would refuse (checked by
    :mod:`tapd.options` once the request is decoded, not by the framing)."""

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
    """Policy refused the request: a rule, or a limit the administrator set,
    decided.  Nothing else: a race lost or a conflict with what exists has a
    code of its own (:class:`OwnerGone`, :class:`TapLeased`), so that
    ``denied`` (and the metrics' ``denied`` outcome) means a rule said no."""

    code = "denied"


class VlanNotPermitted(Denied):
    """The request's ``vlan`` is not one of the access VLANs its allow rule
    permits."""

    code = "vlan-not-permitted"


class LeaseNotFound(ClientError):
    """No lease of yours by that id or name (another uid's leases are never
    acknowledged, not even by a different error)."""

    code = "lease-not-found"


class QuotaExceeded(Denied):
    """The requester already holds as many taps as its rule allows."""

    code = "quota-exceeded"


class CoolingOff(Denied):
    """One of the requester's taps on that bridge was taken from it lately
    for changing its address again and again (``lease.revoked``); it gets no
    tap there until the cool-off ends."""

    code = "cooling-off"


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


class OwnerGone(ClientError):
    """The process the tap would belong to (the requester, or for
    ``bridge-helper`` its VMM) exited before the tap was made.

    The client's fault, as trio's ``ClosedResourceError`` is "you closed it":
    its own side went away mid-request.  No rule refused it (not
    :class:`Denied`) and the host did nothing wrong (not a
    :class:`SystemFault`); the same request from a live process succeeds."""

    code = "owner-gone"


class TapLeased(ClientError):
    """The tap sent with ``fd=``/``fds=`` has a lease already (a second
    adoption of it, or two adoptions racing, one lost).

    The client's fault the way :class:`IfnameTaken` is: the request is at
    odds with what exists, a lease, and fails the same way while that lease
    lives.  No rule decided it (not :class:`Denied`), and the host is fine
    (not a :class:`SystemFault`)."""

    code = "tap-leased"


class VlanNotConfigured(ClientError):
    """The request asked for a ``vlan`` and its allow rule puts its taps in
    none: there is no VLAN to choose from, so the key cannot apply."""

    code = "vlan-not-configured"


class NotApplicable(ClientError):
    """A key that is valid for another op but cannot apply to this one (e.g.
    ``fd=`` with ``prepare``: a VMM that opens its tap by name has no fd)."""

    code = "option-not-applicable"


class Unsupported(ClientError):
    """The request requires what this host's kernel does not offer
    (``vnet_hdr=on`` without ``IFF_VNET_HDR``, queues without
    ``IFF_MULTI_QUEUE``), as QEMU's ``tap_open()`` refuses it: the request is
    what must change here."""

    code = "unsupported"


# -- the system's fault --------------------------------------------------------


class SystemFault(TapdError):
    """The system's fault: the request was fine; the host could not carry it
    out.  Abstract."""


class KernelError(SystemFault):
    """A syscall failed.  ``errno`` keeps the kernel's answer for the log.
    Concrete (``kernel-error``, any failure without a finer class below)."""

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


class VlanFilteringOff(SystemFault):
    """The allow rule puts its taps in VLANs, and their bridge does not filter
    VLANs (``vlan_filtering`` 0): the port would be in every VLAN at once.
    The host's setup, not the request, must change; tapd never turns VLAN
    filtering on by itself, since that changes every port of the bridge."""

    code = "vlan-filtering-off"


class HookFailed(SystemFault):
    """The administrator's network script failed."""

    code = "script-failed"


class HelperFailed(SystemFault):
    """The administrator's bridge helper failed."""

    code = "helper-failed"


class Overloaded(SystemFault):
    """``max_connections`` (or the uid's ``max_connections_per_uid``) is
    reached; the request may well succeed shortly."""

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
    """A bug in tapd: what :func:`to_wire` answers for any exception that is
    not a :class:`TapdError`; its details stay in the log."""

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
    """The reply for any exception, and the only way one becomes a reply:
    tapd's own carry their code and message; anything else (a bug, among
    them the ``TypeError`` of making an abstract error) is an internal error
    whose details stay in the log."""
    if not isinstance(exc, TapdError):
        exc = InternalError(
            "tapd hit an internal error; the request was not carried out "
            "(details are in the daemon's log)"
        )
    return {"ok": False, "error": {"code": exc.code, "message": exc.message}}
