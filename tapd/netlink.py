"""Everything tapd asks of rtnetlink.

With :mod:`tapd.tun` (and this module's two parts of its own, :mod:`tapd.ports`
for bridge ports and :mod:`tapd.shaping` for rates) the only module that
reaches the kernel.  :class:`Netlink`
is synchronous.  Links are asked for (looked up, dumped, removed) and set
(:meth:`Netlink.join_bridge`, the per-tap message) in messages packed here,
on a socket of each calling thread's own: a few syscalls, cheap enough for
the trio loop to make itself, and no pyroute2.  pyroute2's IPRoute serves
the rest (addresses, FDB, VLANs, port flags, qdiscs: what fences and rates
need) on the :class:`~tapd.worker.KernelWorker` thread, which owns it
(pyroute2 keeps per-thread state); it is imported on its first use, so a
daemon whose rules fence nothing never loads it, and one that does, not
before its first tap (pyroute2 0.9's import, asyncio and ssl with it, was
two fifths of the daemon's start).  :func:`link_events` listens for link changes on the
trio loop: a link removed, a tap's last queue closed, events lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import errno
import os
import secrets
import socket
import struct
import sys
import threading
import typing
from collections.abc import Callable
from dataclasses import dataclass

import trio

from . import log, tun
from .errors import BridgeNotFound, NotABridge, kernel_error
from .fence import TAP_PREFIX
from .ports import BridgePorts, netlink_error
from .shaping import Shaping

if typing.TYPE_CHECKING:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError


@dataclass(frozen=True)
class Bridge:
    name: str
    index: int
    mtu: int


@dataclass(frozen=True)
class TunInfo:
    """A tun/tap device as rtnetlink reports it: IFLA_INFO_DATA of kind "tun"
    (drivers/net/tun.c: tun_fill_info())."""

    owner: int | None  # TUNSETOWNER's uid; None: no owner
    group: int | None  # TUNSETGROUP's gid; None: no group
    persist: bool  # TUNSETPERSIST: outlives its last queue
    multi_queue: bool
    #: queues attached now.  tun_fill_info reports the count for multi-queue
    #: devices only; a single-queue device's one queue is attached exactly
    #: while its carrier is on (tun_attach() turns it on, __tun_detach()
    #: turns it off as the last queue closes), so IFLA_CARRIER says 1 or 0.
    queues: int
    #: queues detached with TUNSETQUEUE/IFF_DETACH_QUEUE but still open
    disabled: int

    @property
    def held(self) -> bool:
        """Some process holds a queue of it (attached or disabled)."""
        return self.queues + self.disabled > 0

    @classmethod
    def from_link(cls, link: Link) -> TunInfo | None:
        """From a link's message; None when it is not a tun device."""
        if link.kind != "tun":
            return None
        multi_queue = bool(link.datum(IFLA_TUN_MULTI_QUEUE))
        if multi_queue:
            queues = link.datum(IFLA_TUN_NUM_QUEUES) or 0
            disabled = link.datum(IFLA_TUN_NUM_DISABLED_QUEUES) or 0
        else:
            queues, disabled = int(link.carrier), 0
        # tun_fill_info() leaves out IFLA_TUN_OWNER/GROUP when none is set.
        return cls(
            owner=link.datum(IFLA_TUN_OWNER),
            group=link.datum(IFLA_TUN_GROUP),
            persist=bool(link.datum(IFLA_TUN_PERSIST)),
            multi_queue=multi_queue,
            queues=queues,
            disabled=disabled,
        )


@dataclass(frozen=True)
class TapLink:
    """Where a tap stands on the host: its tun facts, its master, up or not."""

    name: str
    master: int | None  # the index of the device it is a port of
    up: bool
    tun: TunInfo


def pin_address(current: bytes, random: bytes) -> bytes:
    """The address to pin a bridge at: the one it has, unless that is no
    address a device may be set to (is_valid_ether_addr()).  A bridge whose
    last port left has 00:00:00:00:00:00 (br_stp_recalculate_bridge_id()
    falls back to br_mac_zero), and dev_set_mac_address() would pin even that,
    since it skips the driver's check for an unchanged address; such a bridge
    gets what a new one gets, a random local unicast address
    (eth_random_addr(), from ``random``)."""
    if any(current) and not current[0] & 0x01:
        return current
    return bytes([(random[0] & 0xFE) | 0x02]) + random[1:6]


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


@dataclass(frozen=True)
class TunLink:
    """What tapd needs to attach a queue of its own to an existing tap."""

    name: str
    info: TunInfo
    #: TUNSETIFF flags matching the device's own: tun_set_iff() copies the
    #: attaching file's IFF_NO_PI / IFF_VNET_HDR onto the device, so any
    #: other flags would change them under the VM
    flags: int


def _oserror(exc: NetlinkError) -> OSError:
    return OSError(exc.code, str(exc))


# <linux/netlink.h>, <linux/rtnetlink.h>
NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTMGRP_LINK = 1
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10  # the links changed during the dump: it may be inconsistent
NLM_F_DUMP = 0x300
IFF_UP = 0x1  # <linux/if.h>
IFF_LOWER_UP = 0x10000  # <linux/if.h>: the carrier is on (reported for running devices)
AF_UNSPEC = 0

# <linux/if_link.h>
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_IFALIAS = 20
IFLA_CARRIER = 33
IFLA_INFO_KIND = 1  # inside IFLA_LINKINFO
IFLA_INFO_DATA = 2  # inside IFLA_LINKINFO: the kind's own attributes
# inside a tun device's IFLA_INFO_DATA (drivers/net/tun.c: tun_fill_info())
IFLA_TUN_OWNER, IFLA_TUN_GROUP, IFLA_TUN_TYPE, IFLA_TUN_PI, IFLA_TUN_VNET_HDR = 1, 2, 3, 4, 5
IFLA_TUN_PERSIST, IFLA_TUN_MULTI_QUEUE = 6, 7
IFLA_TUN_NUM_QUEUES, IFLA_TUN_NUM_DISABLED_QUEUES = 8, 9
IFLA_BR_VLAN_FILTERING = 7  # inside a bridge's IFLA_INFO_DATA
#: an attribute's type without NLA_F_NESTED and NLA_F_NET_BYTEORDER
_NLA_TYPE_MASK = 0x3FFF
#: a dump's datagrams are at most a page or two (netlink_dump()); room to spare
_DUMP_BUFFER = 1 << 18

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_NLATTR = struct.Struct("=HH")  # len, type
_U32 = struct.Struct("=I")
_NLMSGERR = struct.Struct("=i")  # nlmsgerr.error, right after the nlmsghdr


def _nla(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes (NLA_ALIGN)."""
    size = _NLATTR.size + len(payload)
    return _NLATTR.pack(size, kind) + payload + b"\0" * (-size % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    """A run of netlink attributes: payload by type."""
    found = {}
    offset = 0
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size or offset + length > len(data):
            break
        found[kind & _NLA_TYPE_MASK] = data[offset + _NLATTR.size : offset + length]
        offset += (length + 3) & ~3
    return found


def _uint(raw: bytes | None) -> int | None:
    """A u8, u16 or u32 attribute (host order)."""
    return None if raw is None else int.from_bytes(raw, sys.byteorder)


def _text(raw: bytes | None) -> str | None:
    """A NUL-terminated string attribute."""
    return None if raw is None else raw.split(b"\0", 1)[0].decode(errors="replace")


@dataclass(frozen=True)
class Link:
    """One interface as an RTM_NEWLINK describes it: what tapd reads of it."""

    index: int
    flags: int  # IFF_*
    name: str
    mtu: int | None
    address: str | None  # as aa:bb:cc:dd:ee:ff
    master: int | None  # the index of the device it is a port of
    alias: str | None
    carrier: bool
    kind: str | None  # IFLA_INFO_KIND: "tun", "bridge", "ifb", ...; None: a plain device
    #: IFLA_INFO_DATA, the kind's own attributes (IFLA_TUN_*, IFLA_BR_*), raw
    data: dict[int, bytes] = dataclasses.field(hash=False, compare=False)

    def datum(self, kind: int) -> int | None:
        """An integer attribute of IFLA_INFO_DATA, None if it is absent."""
        return _uint(self.data.get(kind))

    @classmethod
    def parse(cls, message: bytes) -> Link:
        """From an RTM_NEWLINK's payload (ifinfomsg and attributes)."""
        _, _, index, flags, _ = _IFINFOMSG.unpack_from(message)
        attrs = _attrs(message[_IFINFOMSG.size :])
        info = _attrs(attrs.get(IFLA_LINKINFO, b""))
        address = attrs.get(IFLA_ADDRESS)
        return cls(
            index=index,
            flags=flags,
            name=_text(attrs.get(IFLA_IFNAME)) or "",
            mtu=_uint(attrs.get(IFLA_MTU)),
            address=None if address is None else _mac(address),
            master=_uint(attrs.get(IFLA_MASTER)),
            alias=_text(attrs.get(IFLA_IFALIAS)),
            carrier=bool(_uint(attrs.get(IFLA_CARRIER))),
            kind=_text(info.get(IFLA_INFO_KIND)),
            data=_attrs(info.get(IFLA_INFO_DATA, b"")),
        )


def _route_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    sock.bind((0, 0))
    return sock


class Netlink(BridgePorts, Shaping):
    """rtnetlink for tapd.  Its sockets are made on first use: a raw socket in
    each thread that asks, IPRoute in the worker thread (its only user).

    The link messages (:meth:`join_bridge`'s RTM_NEWLINK, the lookups and
    dumps of RTM_GETLINK, RTM_DELLINK) are fixed in shape, packed and parsed
    here: through IPRoute a tap's cost 666 us where the kernel needs about
    200, pyroute2's encoder alone 120 us of the GIL, and its import 100 ms of
    the daemon's start.  IPRoute does the rest, off the hot path.
    """

    def __init__(self) -> None:
        self._ipr: IPRoute | None = None
        #: each thread's own socket for join_bridge (replies are matched by
        #: sequence number, so two threads must never share one)
        self._local = threading.local()
        self._socks: list[socket.socket] = []
        #: bridges by name; an entry goes when a check finds its link changed
        self._bridges: dict[str, Bridge] = {}

    @property
    def _ip(self) -> IPRoute:
        if self._ipr is None:
            from pyroute2 import IPRoute  # here: see the module's docstring

            self._ipr = IPRoute()
        return self._ipr

    def _get_links(self, body: bytes, *, dump: bool) -> tuple[int, list[Link]]:
        """One RTM_GETLINK on this thread's socket: (errno, links).  A dump
        that the kernel marks interrupted (links changed meanwhile) is redone."""
        for _ in range(10):
            err, links, interrupted = self._get_links_once(body, dump)
            if not interrupted:
                break
        return err, links

    def _get_links_once(self, body: bytes, dump: bool) -> tuple[int, list[Link], bool]:
        local = self._local
        sock = self.thread_socket()
        local.seq += 1
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
        sock.send(
            _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETLINK, flags, local.seq, 0) + body
        )
        links: list[Link] = []
        interrupted = False
        while True:
            data = sock.recv(_DUMP_BUFFER)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, mflags, seq, _ = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    break
                if seq == local.seq:
                    interrupted |= bool(mflags & NLM_F_DUMP_INTR)
                    if kind == NLMSG_ERROR:
                        err = -int(_NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)[0])
                        return err, links, interrupted
                    if kind == NLMSG_DONE:
                        return 0, links, interrupted
                    if kind == RTM_NEWLINK:
                        links.append(Link.parse(data[offset + _NLMSGHDR.size : offset + length]))
                        if not dump:
                            return 0, links, False
                offset += (length + 3) & ~3

    def links(self) -> list[Link]:
        """Every interface now (an RTM_GETLINK dump)."""
        err, links = self._get_links(_IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0), dump=True)
        if err:
            raise kernel_error(OSError(err, os.strerror(err)), "listing the interfaces")
        return links

    def link(self, *, index: int = 0, name: str | None = None) -> Link | None:
        """Interface ``index`` or ``name`` now; None if there is none."""
        body = _IFINFOMSG.pack(AF_UNSPEC, 0, index, 0, 0)
        if name is not None:
            body += _nla(IFLA_IFNAME, name.encode() + b"\0")
        err, links = self._get_links(body, dump=False)
        if err in (errno.ENODEV, errno.ENOENT) or (not err and not links):
            return None
        if err:
            what = f"interface {name!r}" if name is not None else f"interface {index}"
            raise kernel_error(OSError(err, os.strerror(err)), f"looking up {what}")
        return links[0]

    def cached_bridge(self, name: str) -> Bridge | None:
        """The bridge called ``name`` if it is known and still the same: two
        ioctls check it (same index: still that bridge; its MTU as it is now).
        None when it must be looked up (:meth:`bridge`).  Safe on any thread."""
        cached = self._bridges.get(name)
        if cached is None:
            return None
        state = tun.link_state(name)
        if state is None or state[0] != cached.index:
            self._bridges.pop(name, None)
            return None
        if state[1] != cached.mtu:
            cached = self._bridges[name] = dataclasses.replace(cached, mtu=state[1])
        return cached

    def bridge(self, name: str) -> Bridge:
        """The bridge called ``name`` now; a new or replaced one costs a
        netlink lookup through pyroute2 (the worker thread's only)."""
        cached = self.cached_bridge(name)
        if cached is not None:
            return cached
        found, address = self._lookup_bridge(name)
        self._pin_address(found, address)
        self._bridges[name] = found
        return found

    def host_addresses(self, name: str) -> list[tuple[str, int]]:
        """The IP addresses (and prefix lengths) the host has on bridge
        ``name``: the router's, the DNS's, whatever the host serves there."""
        index = self.bridge(name).index
        try:
            return [
                (str(msg.get("IFA_ADDRESS")), int(msg["prefixlen"]))
                for msg in self._ip.get_addr(index=index)
                if msg.get("IFA_ADDRESS")
            ]
        except netlink_error() as exc:
            raise kernel_error(_oserror(exc), f"listing the addresses of bridge {name}") from None

    def _pin_address(self, bridge: Bridge, address: str) -> None:
        """Make the bridge's address its administrator's, at the value it has.

        A bridge whose address was never set takes the lowest address among
        its ports, again at every port change (net/bridge/br_stp_if.c:
        br_stp_recalculate_bridge_id()), and a VM may set its tap's address to
        anything through its fd (SIOCSIFHWADDR needs no privilege there): it
        could take the host's address on the bridge.  An address set through
        rtnetlink, even to the value it already has, is NET_ADDR_SET
        (net/core/dev.c: dev_set_mac_address()), and the bridge then keeps it.
        rtnetlink does not report addr_assign_type, so tapd sets it on every
        bridge it looks up; once set, setting it again changes nothing.
        """
        current = bytes.fromhex(address.replace(":", ""))
        pinned = pin_address(current, secrets.token_bytes(6))
        body = _IFINFOMSG.pack(0, 0, bridge.index, 0, 0) + _nla(IFLA_ADDRESS, pinned)
        err = self._request(RTM_NEWLINK, body)
        if err == errno.ENODEV:
            raise BridgeNotFound(f"bridge {bridge.name!r} went away while tapd looked it up")
        if err:
            raise kernel_error(
                OSError(err, os.strerror(err)), f"fixing the address of bridge {bridge.name!r}"
            )
        log.get().info(
            "bridge.address.pinned",
            bridge=bridge.name,
            address=_mac(pinned),
            was=None if pinned == current else address,
        )

    def _lookup_bridge(self, name: str) -> tuple[Bridge, str]:
        link = self.link(name=name)
        if link is None:
            raise BridgeNotFound(
                f"bridge {name!r} does not exist; create it "
                f"(ip link add {name} type bridge) or ask for another"
            )
        if link.kind != "bridge":
            raise NotABridge(
                f"interface {name!r} is a {link.kind or 'plain'} device, not a bridge; "
                "name a Linux bridge in br="
            )
        bridge = Bridge(name=name, index=link.index, mtu=int(link.mtu or 0))
        return bridge, str(link.address)

    def join_bridge(
        self,
        index: int,
        name: str,
        bridge: Bridge,
        mac: str,
        alias: str | None = None,
        up: bool = True,
    ) -> None:
        """Copy the bridge's MTU, set the address (and the lease tag), enslave,
        bring up (unless ``up`` is false: see :meth:`bring_up`).

        rtnetlink's do_setlink() applies IFLA_ADDRESS and IFLA_MTU before
        IFLA_MASTER, so one message would do; but an IFLA_IFALIAS makes it
        announce a NETDEV_CHANGE after enslaving, and the bridge's handling of
        that grows with its ports (measured: +22 us a tap on an empty bridge,
        +100 us with 250 ports).  So a tagged tap gets its tag, address and
        MTU first, while it is nobody's port, and joins in a second message:
        cheaper at every bridge size.
        """
        config = _nla(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", ""))) + _nla(
            IFLA_MTU, _U32.pack(bridge.mtu)
        )
        join = _nla(IFLA_MASTER, _U32.pack(bridge.index))
        flag = IFF_UP if up else 0
        if alias is None:
            steps = [_IFINFOMSG.pack(0, 0, index, flag, IFF_UP) + config + join]
        else:
            steps = [
                _IFINFOMSG.pack(0, 0, index, 0, 0) + config + _nla(IFLA_IFALIAS, alias.encode()),
                _IFINFOMSG.pack(0, 0, index, flag, IFF_UP) + join,
            ]
        for step, body in enumerate(steps):
            err = self._request(RTM_NEWLINK, body)
            if not err:
                continue
            if step and alias is not None:
                # Leave no tag on a tap that did not join: an adopted tap
                # stays its owner's, and a restarted tapd would take a tagged
                # one for a lease.
                self.clear_tag(index)
            if err in (errno.EINVAL, errno.ENODEV) and step == len(steps) - 1:
                # do_set_master() answers EINVAL for a master index that no
                # longer exists: was that the bridge going away?
                state = tun.link_state(bridge.name)
                if state is None or state[0] != bridge.index:
                    self._bridges.pop(bridge.name, None)
                    raise BridgeNotFound(
                        f"bridge {bridge.name!r} went away while {name!r} was joining it"
                    )
            raise kernel_error(
                OSError(err, os.strerror(err)), f"attaching {name!r} to bridge {bridge.name!r}"
            )

    def bring_up(self, index: int) -> None:
        """Bring a port up that joined its bridge down.  A port whose device
        is down is BR_STATE_DISABLED, and br_handle_frame() drops what arrives
        on it: a fenced tap joins down and comes up only once its fence is in
        place, since whoever may attach to it (an adopted tap's client, a
        prepared or multi-queue tap's owner) could send the moment it is up."""
        err = self._request(RTM_NEWLINK, _IFINFOMSG.pack(0, 0, index, IFF_UP, IFF_UP))
        if err:
            raise kernel_error(OSError(err, os.strerror(err)), f"bringing up interface {index}")

    def clear_tag(self, index: int) -> None:
        """Remove a lease tag (an empty IFLA_IFALIAS); a tap already gone is
        no error."""
        err = self._request(
            RTM_NEWLINK, _IFINFOMSG.pack(0, 0, index, 0, 0) + _nla(IFLA_IFALIAS, b"")
        )
        if err and err != errno.ENODEV:
            raise kernel_error(OSError(err, os.strerror(err)), f"untagging interface {index}")

    def thread_socket(self) -> socket.socket:
        """This thread's socket for hand-packed requests, made on first use
        (the daemon makes the loop's and the worker's at start, so that its
        set of open fds does not change with the first request of a kind)."""
        local = self._local
        sock: socket.socket | None = getattr(local, "sock", None)
        if sock is None:
            sock = local.sock = _route_socket()
            local.seq = 0
            self._socks.append(sock)
        return sock

    def _request(self, kind: int, body: bytes) -> int:
        """Send one request on this thread's socket; the errno of its ack (0: done)."""
        local = self._local
        sock = self.thread_socket()
        local.seq += 1
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, local.seq, 0
        )
        sock.send(header + body)
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind_, _, seq, _ = _NLMSGHDR.unpack_from(data, offset)
                if kind_ == NLMSG_ERROR and seq == local.seq:
                    return -int(_NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)[0])
                offset += max(length, _NLMSGHDR.size)

    def delete(self, index: int) -> bool:
        """Remove an interface (a tun device goes even while fds hold it).
        False if it was already gone."""
        err = self._request(RTM_DELLINK, _IFINFOMSG.pack(AF_UNSPEC, 0, index, 0, 0))
        if err == errno.ENODEV:
            return False
        if err:
            raise kernel_error(OSError(err, os.strerror(err)), f"removing interface {index}")
        return True

    def tun_info(self, index: int) -> TunInfo | None:
        """What the kernel says about tun/tap device ``index``; None when there
        is no such interface or it is not a tun device."""
        link = self.link(index=index)
        return None if link is None else TunInfo.from_link(link)

    def tap_link(self, index: int) -> TapLink | None:
        """:meth:`tun_info` with the tap's name, master and up flag, from one
        lookup."""
        link = self.link(index=index)
        info = None if link is None else TunInfo.from_link(link)
        if link is None or info is None:
            return None
        return TapLink(name=link.name, master=link.master, up=bool(link.flags & IFF_UP), tun=info)

    def tun_link(self, index: int) -> TunLink | None:
        """Tun device ``index``: its state, name and the flags to attach a
        queue by; None if there is no such interface or it is no tun device."""
        link = self.link(index=index)
        info = None if link is None else TunInfo.from_link(link)
        if link is None or info is None:
            return None
        flags = link.datum(IFLA_TUN_TYPE) or tun.IFF_TAP
        if not link.datum(IFLA_TUN_PI):
            flags |= tun.IFF_NO_PI
        if link.datum(IFLA_TUN_VNET_HDR):
            flags |= tun.IFF_VNET_HDR
        if info.multi_queue:
            flags |= tun.IFF_MULTI_QUEUE
        return TunLink(name=link.name, info=info, flags=flags)

    def give_back(self, index: int) -> bool:
        """Detach an interface from its bridge, bring it down and remove its
        lease tag, in one RTM_NEWLINK (IFLA_MASTER 0 is "no master":
        do_set_master()): a client's tap back as its maker handed it over
        (tapd adopts only a tap that is down and nobody's port).  False if it
        was already gone."""
        body = _IFINFOMSG.pack(0, 0, index, 0, IFF_UP) + _nla(IFLA_MASTER, _U32.pack(0))
        err = self._request(RTM_NEWLINK, body + _nla(IFLA_IFALIAS, b""))
        if err == errno.ENODEV:
            return False
        if err:
            raise kernel_error(OSError(err, os.strerror(err)), f"giving back interface {index}")
        return True

    def tagged_taps(self) -> list[tuple[int, str, str]]:
        """(index, name, alias) of every tun/tap device that has an alias."""
        return [
            (link.index, link.name, link.alias)
            for link in self.links()
            if link.alias and link.kind == "tun"
        ]

    def present(self) -> set[int]:
        """Indexes of every interface now (to resynchronise after lost events)."""
        return {link.index for link in self.links()}

    def addresses(self) -> dict[int, str]:
        """Every interface's address now, by index (to look again after lost
        events, or at start)."""
        return {link.index: link.address for link in self.links() if link.address}

    def port_address(self, index: int) -> tuple[str, int | None] | None:
        """Interface ``index``'s address and master now; None when it is gone."""
        link = self.link(index=index)
        return None if link is None else (str(link.address), link.master)

    def set_address(self, index: int, mac: str) -> bool:
        """Give interface ``index`` the address ``mac``; False if it is gone."""
        body = _IFINFOMSG.pack(0, 0, index, 0, 0) + _nla(
            IFLA_ADDRESS, bytes.fromhex(mac.replace(":", ""))
        )
        err = self._request(RTM_NEWLINK, body)
        if err == errno.ENODEV:
            return False
        if err:
            raise kernel_error(OSError(err, os.strerror(err)), f"readdressing interface {index}")
        return True

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        # At shutdown, with no request left on any thread.
        for sock in self._socks:
            sock.close()
        self._socks.clear()
        self._local = threading.local()


# <linux/filter.h>: classic BPF, to drop events tapd does not need in the kernel
_BPF_INSN = struct.Struct("=HBBI")
_BPF_LD_W_ABS, _BPF_LD_H_ABS, _BPF_LD_B_ABS = 0x20, 0x28, 0x30
_BPF_LD_W_IND, _BPF_LD_H_IND = 0x40, 0x48
_BPF_LD_IMM, _BPF_LDX_IMM, _BPF_TAX = 0x00, 0x01, 0x07
_BPF_JEQ_K, _BPF_JSET_K, _BPF_RET_K = 0x15, 0x45, 0x06
SO_ATTACH_FILTER = 26
#: ancillary loads (SKF_AD_OFF + SKF_AD_NLATTR / _NEST): A = the offset of
#: attribute X in the attributes from offset A (or in the nest at A), 0 if
#: none (net/core/filter.c: bpf_skb_get_nlattr(), bpf_skb_get_nlattr_nest())
_SKF_NLATTR, _SKF_NLATTR_NEST = 0xFFFFF000 + 12, 0xFFFFF000 + 16
#: where an RTM_NEWLINK's attributes start: nlmsghdr, then ifinfomsg
_IFLA_AT = _NLMSGHDR.size + _IFINFOMSG.size
#: IFLA_INFO_KIND of a tun device, "tun\0", as a BPF word load sees it
_TUN_KIND = int.from_bytes(b"tun\0", "big")


def _flag_byte(bit: int) -> tuple[int, int]:
    """(offset in the message, mask) of ifinfomsg.ifi_flags' byte holding
    ``bit``: ifi_flags is host order, and BPF loads bytes as they lie."""
    position = bit.bit_length() - 1
    byte = position // 8 if sys.byteorder == "little" else 3 - position // 8
    return _NLMSGHDR.size + 8 + byte, 1 << (position % 8)


_Insn = tuple[int, int | str, int | str, int]


def _assemble(program: list[_Insn | str]) -> bytes:
    """Classic BPF from instructions and labels (strings): a jump names the
    label it goes to, or 0 for the next instruction."""
    labels: dict[str, int] = {}
    insns: list[_Insn] = []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)

    def offset(target: int | str, at: int) -> int:
        return target if isinstance(target, int) else labels[target] - at - 1

    return b"".join(
        _BPF_INSN.pack(code, offset(jt, at), offset(jf, at), k)
        for at, (code, jt, jf, k) in enumerate(insns)
    )


def _only_link_ends(sock: socket.socket) -> None:
    """Let only RTM_DELLINK, RTM_NEWLINK of an up link without carrier, and
    RTM_NEWLINK of a tun device that is some device's port with an address
    tapd never gives a tap, reach ``sock``.

    Making one tap raises several RTM_NEWLINK events (all while it is down,
    or up with its carrier on, and with tapd's address from its first port
    message on); filtered out in the kernel, they never wake tapd.  A
    persistent tap whose last queue closes loses its carrier (__tun_detach()
    calls netif_carrier_off()), and linkwatch announces that as an
    RTM_NEWLINK while the link is up: that one passes.  So does the
    RTM_NEWLINK that a tap's new address raises (NETDEV_CHANGEADDR, through
    rtnetlink_event()) when its holder set one through its fd (SIOCSIFHWADDR
    needs no privilege there) while it is a bridge port: the bridge took that
    address as the port's own, displacing whatever FDB entry it had.

    Only the link's own messages (AF_UNSPEC): a bridge announces its ports
    in AF_BRIDGE messages, and a port leaving the bridge (or the bridge
    going) is an AF_BRIDGE RTM_DELLINK for the port (br_ifinfo_notify() in
    del_nbp()), while the tap itself lives on.
    """
    # A BPF half-word load is big-endian; nlmsg_type is in host order.
    dellink = int.from_bytes(struct.pack("=H", RTM_DELLINK), "big")
    newlink = int.from_bytes(struct.pack("=H", RTM_NEWLINK), "big")
    up_at, up_mask = _flag_byte(IFF_UP)
    lower_at, lower_mask = _flag_byte(IFF_LOWER_UP)
    program = _assemble([
        (_BPF_LD_B_ABS, 0, 0, _NLMSGHDR.size),  # A = ifinfomsg.ifi_family
        (_BPF_JEQ_K, 0, "drop", AF_UNSPEC),
        (_BPF_LD_H_ABS, 0, 0, 4),  # A = nlmsghdr.nlmsg_type
        (_BPF_JEQ_K, "keep", 0, dellink),
        (_BPF_JEQ_K, 0, "drop", newlink),
        (_BPF_LD_B_ABS, 0, 0, up_at),
        (_BPF_JSET_K, 0, "address", up_mask),  # down
        (_BPF_LD_B_ABS, 0, 0, lower_at),
        (_BPF_JSET_K, "address", "keep", lower_mask),  # up without carrier: kept
        "address",  # a port, whose address is not a tap's of tapd's...
        (_BPF_LD_IMM, 0, 0, _IFLA_AT),
        (_BPF_LDX_IMM, 0, 0, IFLA_MASTER),
        (_BPF_LD_W_ABS, 0, 0, _SKF_NLATTR),
        (_BPF_JEQ_K, "drop", 0, 0),
        (_BPF_LD_IMM, 0, 0, _IFLA_AT),
        (_BPF_LDX_IMM, 0, 0, IFLA_ADDRESS),
        (_BPF_LD_W_ABS, 0, 0, _SKF_NLATTR),
        (_BPF_JEQ_K, "drop", 0, 0),
        (_BPF_TAX, 0, 0, 0),
        (_BPF_LD_H_IND, 0, 0, _NLATTR.size),  # the address's first two octets
        (_BPF_JEQ_K, "drop", 0, int.from_bytes(TAP_PREFIX, "big")),
        (_BPF_LD_IMM, 0, 0, _IFLA_AT),  # ...and a tun device
        (_BPF_LDX_IMM, 0, 0, IFLA_LINKINFO),
        (_BPF_LD_W_ABS, 0, 0, _SKF_NLATTR),
        (_BPF_JEQ_K, "drop", 0, 0),
        (_BPF_LDX_IMM, 0, 0, IFLA_INFO_KIND),
        (_BPF_LD_W_ABS, 0, 0, _SKF_NLATTR_NEST),
        (_BPF_JEQ_K, "drop", 0, 0),
        (_BPF_TAX, 0, 0, 0),
        (_BPF_LD_W_IND, 0, 0, _NLATTR.size),
        (_BPF_JEQ_K, "keep", "drop", _TUN_KIND),
        "keep",
        (_BPF_RET_K, 0, 0, 0xFFFF_FFFF),  # the whole message
        "drop",
        (_BPF_RET_K, 0, 0, 0),
    ])  # fmt: skip
    buf = ctypes.create_string_buffer(program)
    fprog = struct.pack("HxxxxxxP", len(program) // _BPF_INSN.size, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class LinkEvent(enum.Enum):
    #: RTM_DELLINK: the interface is gone
    REMOVED = "removed"
    #: an up link lost its carrier: for a tun device, its last queue closed
    #: (a persistent one stays; any other is removed right after)
    IDLE = "idle"
    #: the kernel dropped events (ENOBUFS): the listener must look again
    OVERRUN = "overrun"
    #: a tun device that is a port (of a bridge) has an address tapd never
    #: gives a tap: its holder set one, which the bridge took as the port's own
    ADDRESS = "address"


#: an up link without carrier: what the filter passes besides RTM_DELLINK
_IDLE_MASK = IFF_UP | IFF_LOWER_UP

LinkCallback = Callable[[LinkEvent, int], None]


async def link_events(
    on_event: LinkCallback,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Report link changes as rtnetlink announces them: ``on_event(kind,
    index)`` (index 0 with :attr:`LinkEvent.OVERRUN`).

    Runs on the trio loop: the socket is non-blocking, a kernel-side filter
    passes only what :func:`_only_link_ends` lets through, and only the fixed
    headers are read.
    """
    raw = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    with contextlib.suppress(OSError):  # SO_RCVBUFFORCE needs CAP_NET_ADMIN
        raw.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    _only_link_ends(raw)
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
                # The kernel says ENOBUFS once per overrun, and only clears its
                # congestion mark when the queue runs empty: drain it first, so
                # that what the resync's dump misses still arrives as events.
                _drain(raw, on_event)
                on_event(LinkEvent.OVERRUN, 0)
                continue
            _report(data, on_event)


def _report(data: bytes, on_event: LinkCallback) -> None:
    offset = 0
    while offset + _NLMSGHDR.size + _IFINFOMSG.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        family, _, index, flags, _ = _IFINFOMSG.unpack_from(data, offset + _NLMSGHDR.size)
        if family != AF_UNSPEC:
            pass  # a bridge's message about its port (the filter drops these)
        elif kind == RTM_DELLINK:
            on_event(LinkEvent.REMOVED, index)
        elif kind == RTM_NEWLINK:
            if flags & _IDLE_MASK == IFF_UP:
                on_event(LinkEvent.IDLE, index)
            if _foreign_port_address(data[offset + _IFLA_AT : offset + length]):
                on_event(LinkEvent.ADDRESS, index)
        offset += (max(length, _NLMSGHDR.size) + 3) & ~3


def _foreign_port_address(attrs: bytes) -> bool:
    """Whether an RTM_NEWLINK's attributes name a master and an address that
    is not a tap's of tapd's (the filter has checked that it is a tun device)."""
    master = address = None
    offset = 0
    while offset + _NLATTR.size <= len(attrs):
        length, kind = _NLATTR.unpack_from(attrs, offset)
        if length < _NLATTR.size:
            break
        if kind == IFLA_MASTER:
            master = attrs[offset + _NLATTR.size : offset + length]
        elif kind == IFLA_ADDRESS:
            address = attrs[offset + _NLATTR.size : offset + length]
        offset += (length + 3) & ~3
    if not master or not address:
        return False
    return address[: len(TAP_PREFIX)] != TAP_PREFIX


def _drain(raw: socket.socket, on_event: LinkCallback) -> None:
    """Read every queued event without waiting (each is still reported); the
    socket is non-blocking, as trio set it."""
    while True:
        try:
            data = raw.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                continue
            raise
        _report(data, on_event)


#: <asm-generic/socket.h>
SO_RCVBUFFORCE = 33
