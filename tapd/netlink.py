"""Everything tapd asks of rtnetlink, through pyroute2.

With :mod:`tapd.tun` the only module that reaches the kernel.  Its methods are
synchronous and must run on the :class:`~tapd.worker.KernelWorker` thread,
which owns the one long-lived ``IPRoute`` socket (pyroute2 keeps per-thread
state, so it is created and used there only).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_LINK

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

    def join_bridge(
        self, index: int, name: str, bridge: Bridge, mac: str, alias: str | None = None
    ) -> None:
        """Copy the bridge's MTU, set the address (and the lease tag), enslave,
        bring up: one message.

        rtnetlink's do_setlink() applies IFLA_ADDRESS and IFLA_MTU before
        IFLA_MASTER, so the port joins with its final address and MTU.
        """
        attrs: dict[str, object] = {
            "index": index,
            "address": mac,
            "mtu": bridge.mtu,
            "master": bridge.index,
            "state": "up",
        }
        if alias is not None:
            attrs["ifalias"] = alias
        try:
            self._ip.link("set", **attrs)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                raise BridgeNotFound(
                    f"bridge {bridge.name!r} went away while {name!r} was joining it"
                ) from None
            raise kernel_error(
                _oserror(exc), f"attaching {name!r} to bridge {bridge.name!r}"
            ) from None

    def delete(self, index: int) -> bool:
        """Remove an interface (a tun device goes even while fds hold it).
        False if it was already gone."""
        try:
            self._ip.link("del", index=index)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise kernel_error(_oserror(exc), f"removing interface {index}") from None
        return True

    def tagged_taps(self) -> list[tuple[int, str, str]]:
        """(index, name, alias) of every tun/tap device that has an alias."""
        found = []
        for msg in self._ip.link("dump"):
            alias = msg.get("IFLA_IFALIAS")
            if alias and msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "tun":
                found.append((int(msg["index"]), str(msg.get("IFLA_IFNAME")), str(alias)))
        return found

    def present(self) -> set[int]:
        """Indexes of every interface now (to resynchronise after lost events)."""
        return {int(msg["index"]) for msg in self._ip.link("dump")}

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


class LinkMonitor:
    """Link removals, as rtnetlink announces them (RTM_DELLINK), delivered to a
    callback from a thread of the monitor's own.

    The callback gets an interface index, or None when the kernel dropped
    events (ENOBUFS) and the listener must resynchronise from a dump.
    """

    def __init__(self, on_event: Callable[[int | None], None]) -> None:
        self._on_event = on_event
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tapd-netlink", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        while True:
            with IPRoute(rcvbuf=4 << 20) as ipr:
                ipr.bind(groups=RTMGRP_LINK)
                self._ready.set()
                try:
                    while True:
                        for msg in ipr.get():
                            if msg["event"] == "RTM_DELLINK":
                                self._on_event(int(msg["index"]))
                except (NetlinkError, OSError):
                    # Overrun (ENOBUFS): some events are lost; say so, then listen anew.
                    self._on_event(None)
