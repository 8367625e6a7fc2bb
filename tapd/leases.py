"""Leases: every tap tapd handed out, from grant until the tap is gone.

The state that must survive tapd lives in the kernel, not here: each tap tapd
makes carries a tag in its interface alias (IFLA_IFALIAS) naming its lease, its
owner and the owner process's start time.  A fresh tapd rebuilds the table from
the interfaces alone (:func:`parse_tag`).  This module is pure: no I/O.
"""

from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any

from .fence import Fence

#: <linux/if.h>: IFALIASZ is 256 including the NUL
IFALIASZ = 256
TAG_PREFIX = "tapd:1"


def new_id() -> str:
    return secrets.token_hex(6)


@dataclass(frozen=True, kw_only=True)
class LeaseTerms:
    """What a lease is, before its tap exists: who holds it and on what terms.

    Its :meth:`tag` goes on the tap as the tap is made (before it joins its
    bridge), so it names nothing that only the made tap knows; :meth:`on`
    then gives the :class:`Lease` whole.
    """

    id: str
    bridge: str
    queues: int
    uid: int
    gid: int
    pid: int
    #: the owner's start time in clock ticks since boot (/proc/PID/stat field
    #: 22): with the pid, it names one process even after the pid is reused
    starttime: int
    created: int  # seconds since the epoch
    downscript: str | None = None
    #: the client made the tap (fd=/fds=): when its owner goes, tapd forgets
    #: the lease but leaves the tap to whoever made it
    adopted: bool = False
    #: made by the prepare op: persistent by design, opened by the VMM by name
    prepared: bool = False
    #: the MAC the guest's NIC uses (the only source MAC a filtered port takes)
    guest_mac: str | None = None
    #: the port flags the rule asked for (tapd.fence.Fence.tag), "" for none
    fence: str = ""
    #: the only source addresses the tap passes, when the rule filters them
    guest_ips: tuple[str, ...] = ()

    def on(self, ifname: str, ifindex: int) -> Lease:
        """The lease of these terms on the tap ``ifname`` (``ifindex``)."""
        terms = {f.name: getattr(self, f.name) for f in fields(LeaseTerms)}
        return Lease(ifname=ifname, ifindex=ifindex, **terms)

    def fits(self) -> bool:
        """Whether the tag fits an interface alias (IFALIASZ)."""
        return len(self._tag().encode()) < IFALIASZ

    def tag(self) -> str:
        """The interface alias that lets a restarted tapd find this lease."""
        tag = self._tag()
        assert len(tag.encode()) < IFALIASZ
        return tag

    def _tag(self) -> str:
        fields = [
            TAG_PREFIX,
            f"id={self.id}",
            f"br={self.bridge}",
            f"q={self.queues}",
            f"uid={self.uid}",
            f"gid={self.gid}",
            f"pid={self.pid}",
            f"start={self.starttime}",
            f"created={self.created}",
        ]
        if self.downscript:
            fields.append(f"down={self.downscript}")
        if self.adopted:
            fields.append("adopted=1")
        if self.prepared:
            fields.append("prepared=1")
        if self.guest_mac:
            fields.append(f"gmac={self.guest_mac}")
        if self.fence:
            fields.append(f"fence={self.fence}")
        if self.guest_ips:
            fields.append(f"ips={','.join(self.guest_ips)}")
        return " ".join(fields)


@dataclass(frozen=True, kw_only=True)
class Lease(LeaseTerms):
    """A tap tapd handed out, from grant until the tap is gone."""

    ifname: str
    ifindex: int

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"id": self.id, "ifname": self.ifname, "ifindex": self.ifindex}
        wire.update(asdict(self))
        del wire["starttime"]
        wire["fence"] = Fence.from_tag(self.fence).on_wire()
        wire["guest_ips"] = self.guest_ips or None
        wire.update(vlans_to_wire(self.fence))
        return wire


def vlans_to_wire(fence: str) -> dict[str, Any]:
    """A lease's VLANs as replies and list show them, from its fence tag."""
    terms = Fence.from_tag(fence)
    return {"vlan": terms.vlan, "vlan_tagged": terms.vlan_tagged or None}


def parse_tag(ifindex: int, ifname: str, alias: str | None) -> Lease | None:
    """The lease a tap's alias describes, or None if it is not a tapd tag."""
    if not alias or not alias.startswith(TAG_PREFIX + " "):
        return None
    fields = dict(part.partition("=")[::2] for part in alias.split()[1:])
    try:
        return Lease(
            id=fields["id"],
            ifname=ifname,
            ifindex=ifindex,
            bridge=fields["br"],
            queues=int(fields["q"]),
            uid=int(fields["uid"]),
            gid=int(fields["gid"]),
            pid=int(fields["pid"]),
            starttime=int(fields["start"]),
            created=int(fields["created"]),
            downscript=fields.get("down") or None,
            adopted=fields.get("adopted") == "1",
            prepared=fields.get("prepared") == "1",
            guest_mac=fields.get("gmac") or None,
            fence=fields.get("fence", ""),
            guest_ips=tuple(ip for ip in fields.get("ips", "").split(",") if ip),
        )
    except (KeyError, ValueError):
        return None


class Registry:
    """Live leases, by interface index (what netlink events carry)."""

    def __init__(self) -> None:
        self._by_index: dict[int, Lease] = {}
        self._per_uid: Counter[int] = Counter()
        #: guest MACs and addresses of live leases: a new lease never takes one
        self.guest_macs: Counter[str] = Counter()
        self.guest_ips: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._by_index)

    def add(self, lease: Lease) -> None:
        old = self._by_index.get(lease.ifindex)
        if old is not None:
            self._forget(old)
        self._by_index[lease.ifindex] = lease
        self._per_uid[lease.uid] += 1
        if lease.guest_mac:
            self.guest_macs[lease.guest_mac] += 1
        self.guest_ips.update(lease.guest_ips)

    def pop(self, ifindex: int) -> Lease | None:
        lease = self._by_index.pop(ifindex, None)
        if lease is not None:
            self._forget(lease)
        return lease

    def _forget(self, lease: Lease) -> None:
        self._per_uid[lease.uid] -= 1
        if not self._per_uid[lease.uid]:
            del self._per_uid[lease.uid]
        if lease.guest_mac:
            self.guest_macs[lease.guest_mac] -= 1
            if not self.guest_macs[lease.guest_mac]:
                del self.guest_macs[lease.guest_mac]
        self.guest_ips.subtract(lease.guest_ips)
        for ip in lease.guest_ips:
            if not self.guest_ips[ip]:
                del self.guest_ips[ip]

    def get(self, ifindex: int) -> Lease | None:
        return self._by_index.get(ifindex)

    def indexes(self) -> frozenset[int]:
        return frozenset(self._by_index)

    def held_by(self, uid: int) -> int:
        """Live leases of ``uid``: counted as they come and go, so a request
        costs the same with 10 leases live or 10,000."""
        return self._per_uid[uid]

    def visible_to(self, uid: int) -> list[Lease]:
        """Root sees every lease; anyone else only their own."""
        leases = sorted(self._by_index.values(), key=lambda lease: lease.created)
        return [lease for lease in leases if uid == 0 or lease.uid == uid]

    def find(self, uid: int, key: str) -> Lease | None:
        """A lease ``uid`` may act on, by id or ifname."""
        for lease in self.visible_to(uid):
            if key in (lease.id, lease.ifname):
                return lease
        return None
