"""Everything tapd asks of rtnetlink, through pyroute2.

With :mod:`tapd.tun` the only module that reaches the kernel.  :class:`Netlink`
is synchronous and runs on the :class:`~tapd.worker.KernelWorker` thread,
which owns its long-lived sockets (pyroute2 keeps per-thread state, so IPRoute
is created and used there only).  :func:`link_events` listens for link changes
on the trio loop itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_LINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from .errors import BridgeNotFound, NotABridge, kernel_error


@dataclass(frozen=True)
class Bridge:
    name: str
    index: int
    mtu: int


def _oserror(exc: NetlinkError) -> OSError:
    return OSError(exc.code, str(exc))


# <linux/netlink.h>, <linux/rtnetlink.h>
NETLINK_ROUTE = 0
NLMSG_ERROR = 2
RTM_NEWLINK = 16
RTM_DELLINK = 17
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
IFF_UP = 0x1  # <linux/if.h>

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINDEX = struct.Struct("=i")  # ifinfomsg.ifi_index, 4 bytes into the ifinfomsg
_NLMSGERR = struct.Struct("=i")  # nlmsgerr.error, right after the nlmsghdr


def _route_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    sock.bind((0, 0))
    return sock


class Netlink:
    """rtnetlink for tapd, created lazily in the worker thread on first use.

    The per-tap message (:meth:`join_bridge`) is encoded by pyroute2's
    ``ifinfmsg`` and sent on a plain netlink socket of tapd's own: IPRoute's
    generic request path costs twice the kernel's own time per call, the
    encoding alone a third of it.  Everything else (lookups, dumps, removals)
    goes through IPRoute.
    """

    def __init__(self) -> None:
        self._ipr: IPRoute | None = None
        self._sock: socket.socket | None = None
        self._seq = 0
        #: bridges by name; an entry goes when its link changes (invalidate())
        self._bridges: dict[str, Bridge] = {}

    @property
    def _ip(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def invalidate(self, index: int) -> None:
        """A link changed or went: forget it if it is a cached bridge.  Safe to
        call from any thread (one dict operation under the GIL)."""
        for name, bridge in list(self._bridges.items()):
            if bridge.index == index:
                self._bridges.pop(name, None)

    def invalidate_all(self) -> None:
        self._bridges.clear()

    def bridge(self, name: str) -> Bridge:
        cached = self._bridges.get(name)
        if cached is not None:
            return cached
        found = self._lookup_bridge(name)
        self._bridges[name] = found
        return found

    def _lookup_bridge(self, name: str) -> Bridge:
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
        attrs: list[tuple[str, object]] = [
            ("IFLA_ADDRESS", mac),
            ("IFLA_MTU", bridge.mtu),
            ("IFLA_MASTER", bridge.index),
        ]
        if alias is not None:
            attrs.append(("IFLA_IFALIAS", alias))
        msg = ifinfmsg()
        msg["index"] = index
        msg["flags"] = msg["change"] = IFF_UP
        msg["attrs"] = attrs
        err = self._request(msg, RTM_NEWLINK)
        if err == errno.ENODEV:
            self.invalidate(bridge.index)
            raise BridgeNotFound(f"bridge {bridge.name!r} went away while {name!r} was joining it")
        if err:
            raise kernel_error(
                OSError(err, os.strerror(err)), f"attaching {name!r} to bridge {bridge.name!r}"
            )

    def _request(self, msg: ifinfmsg, kind: int) -> int:
        """Send one request on tapd's own socket; the errno of its ack (0: done)."""
        if self._sock is None:
            self._sock = _route_socket()
        self._seq += 1
        msg["header"]["type"] = kind
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
        msg["header"]["sequence_number"] = self._seq
        msg.encode()
        self._sock.send(msg.data)
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind_, _, seq, _ = _NLMSGHDR.unpack_from(data, offset)
                if kind_ == NLMSG_ERROR and seq == self._seq:
                    return -int(_NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)[0])
                offset += max(length, _NLMSGHDR.size)

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
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def link_events(
    on_event: Callable[[int, int | None], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Report link changes as rtnetlink announces them: ``on_event(kind,
    index)`` with kind RTM_NEWLINK or RTM_DELLINK, or ``on_event(0, None)``
    when the kernel dropped events (ENOBUFS) and the listener must resync.

    Runs on the trio loop: the socket is non-blocking, and only the fixed
    headers are read (the message type and ifinfomsg's index), because fully
    decoding every event - several per tap made - costs more than making it.
    """
    raw = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    with contextlib.suppress(OSError):  # SO_RCVBUFFORCE needs CAP_NET_ADMIN
        raw.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    raw.bind((0, RTMGRP_LINK))
    sock = trio.socket.from_stdlib_socket(raw)
    with sock:
        task_status.started()
        while True:
            try:
                data = await sock.recv(1 << 16)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                on_event(0, None)
                continue
            offset = 0
            while offset + _NLMSGHDR.size + 8 <= len(data):
                length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
                if kind in (RTM_NEWLINK, RTM_DELLINK):
                    (index,) = _IFINDEX.unpack_from(data, offset + _NLMSGHDR.size + 4)
                    on_event(kind, index)
                offset += (max(length, _NLMSGHDR.size) + 3) & ~3


#: <asm-generic/socket.h>
SO_RCVBUFFORCE = 33
