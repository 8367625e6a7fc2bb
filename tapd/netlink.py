"""Everything tapd asks of rtnetlink, through pyroute2.

With :mod:`tapd.tun` the only module that reaches the kernel.  Its methods are
synchronous and must run on the :class:`~tapd.worker.KernelWorker` thread,
which owns the one long-lived ``IPRoute`` socket (pyroute2 keeps per-thread
state, so it is created and used there only).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import BridgeNotFound, NotABridge, kernel_error


@dataclass(frozen=True)
class Bridge:
    name: str
    index: int
    mtu: int


def _oserror(exc: NetlinkError) -> OSError:
    return OSError(exc.code, str(exc))


class Netlink:
    """Created lazily in the worker thread on first use."""

    def __init__(self) -> None:
        self._ipr: IPRoute | None = None

    @property
    def _ip(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def bridge(self, name: str) -> Bridge:
        try:
            (msg,) = self._ip.link("get", ifname=name)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                raise BridgeNotFound(
                    f"bridge {name!r} does not exist; create it "
                    f"(ip link add {name} type bridge) or ask for another"
                ) from None
            raise kernel_error(_oserror(exc), f"looking up bridge {name!r}") from None
        kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
        if kind != "bridge":
            raise NotABridge(
                f"interface {name!r} is a {kind or 'plain'} device, not a bridge; "
                "name a Linux bridge in br="
            )
        return Bridge(name=name, index=int(msg["index"]), mtu=int(msg.get("IFLA_MTU")))

    def join_bridge(self, index: int, name: str, bridge: Bridge, mac: str) -> None:
        """Copy the bridge's MTU, set the address, enslave, bring up: one message.

        rtnetlink's do_setlink() applies IFLA_ADDRESS and IFLA_MTU before
        IFLA_MASTER, so the port joins with its final address and MTU.
        """
        try:
            self._ip.link(
                "set",
                index=index,
                address=mac,
                mtu=bridge.mtu,
                master=bridge.index,
                state="up",
            )
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                raise BridgeNotFound(
                    f"bridge {bridge.name!r} went away while {name!r} was joining it"
                ) from None
            raise kernel_error(
                _oserror(exc), f"attaching {name!r} to bridge {bridge.name!r}"
            ) from None

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
