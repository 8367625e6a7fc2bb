"""What a bridge port may do, and the guest's MAC address.  Pure logic.

A VM on a bridge port can by default send with any source MAC (and so steal
another VM's traffic or poison the bridge's forwarding table) and reach every
other port.  An ``[[allow]]`` rule can fence the ports it grants, with the
Linux bridge's own port flags (net/bridge/br_input.c, br_handle_frame_finish
and br_forward.c, should_deliver):

* ``mac_filtering``: the port is ``locked`` (a frame whose source MAC has no
  FDB entry pointing at this port is dropped) with ``learning`` off, and one
  static FDB entry for the lease's ``guest_mac``: the guest can send with that
  address and no other.
* ``port_isolation``: the port is ``isolated``: it reaches non-isolated ports
  (the uplink, the host's bridge device) but no other isolated port.
* ``learning`` / ``flood``: the port's learning and unicast-flood flags as the
  admin sets them (``mac_filtering`` turns learning off by itself: a locked
  port that learns would let the guest add addresses).

The guest's MAC is tapd's, not QEMU's, idea: every grant carries one
(``guest_mac``), the request's own if it asked for a free one, else one tapd
draws under a locally administered prefix, unique among live leases.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Container
from dataclasses import dataclass

from .errors import GuestMacInUse, InvalidValue

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_PREFIX = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){0,4}")

#: QEMU's own prefix for NICs (qemu_macaddr_default_if_unset), locally administered
DEFAULT_PREFIX = "52:54:00"

#: how often to draw again when a drawn address is in use
_DRAWS = 64


def parse_mac(text: str, what: str = "guest_mac") -> str:
    """``text`` as a lower-case unicast Ethernet address, or :class:`InvalidValue`."""
    mac = text.lower()
    if not _MAC.fullmatch(mac):
        raise InvalidValue(f'{what}: {text!r} is not a MAC address like "52:54:00:12:34:56"')
    first = int(mac[:2], 16)
    if first & 1:
        raise InvalidValue(f"{what}: {text} is a multicast address; a NIC needs a unicast one")
    if mac == "00:00:00:00:00:00":
        raise InvalidValue(f"{what}: the all-zero address is no NIC's")
    return mac


def check_prefix(prefix: str) -> str:
    """A ``guest_mac_prefix``: one to five octets, unicast, locally administered."""
    value = prefix.lower()
    if not _PREFIX.fullmatch(value):
        raise ValueError(f'{prefix!r} is not one to five octets like "52:54:00"')
    first = int(value[:2], 16)
    if first & 1:
        raise ValueError(f"{prefix} starts a multicast address")
    if not first & 2:
        raise ValueError(
            f"{prefix} is not locally administered (the first octet needs bit 0x02): "
            "tapd must not draw addresses that belong to a vendor"
        )
    return value


def choose_mac(wanted: str | None, prefix: str, taken: Container[str]) -> str:
    """The guest MAC for a new lease: ``wanted`` if free, else a fresh one
    under ``prefix`` that no live lease has."""
    if wanted is not None:
        mac = parse_mac(wanted)
        if mac in taken:
            raise GuestMacInUse(
                f"guest_mac {mac} is already the guest MAC of a live lease; "
                "leave guest_mac out and tapd picks a free one"
            )
        return mac
    octets = prefix.split(":")
    for _ in range(_DRAWS):
        mac = ":".join(octets + [f"{b:02x}" for b in secrets.token_bytes(6 - len(octets))])
        if mac not in taken and mac != "00:00:00:00:00:00":
            return mac
    raise GuestMacInUse(f"no free guest MAC under {prefix}; ask the administrator for a wider one")


@dataclass(frozen=True)
class Fence:
    """The port flags an allow rule asks for (None: leave the kernel's default)."""

    mac_filtering: bool = False
    isolated: bool = False
    learning: bool | None = None
    flood: bool | None = None

    @property
    def wanted(self) -> bool:
        return (
            self.mac_filtering
            or self.isolated
            or self.learning is not None
            or self.flood is not None
        )

    def port_flags(self) -> dict[str, bool]:
        """The bridge port flags to set, by their rtnetlink names
        (IFLA_BRPORT_LOCKED, _ISOLATED, _LEARNING, _UNICAST_FLOOD)."""
        flags: dict[str, bool] = {}
        if self.mac_filtering:
            flags["locked"] = True
            flags["learning"] = False
        if self.isolated:
            flags["isolated"] = True
        if self.learning is not None and not self.mac_filtering:
            flags["learning"] = self.learning
        if self.flood is not None:
            flags["unicast_flood"] = self.flood
        return flags

    def tag(self) -> str:
        """A compact spelling for the lease tag, e.g. ``M-I-L0F1``."""
        parts = []
        if self.mac_filtering:
            parts.append("M")
        if self.isolated:
            parts.append("I")
        if self.learning is not None:
            parts.append(f"L{int(self.learning)}")
        if self.flood is not None:
            parts.append(f"F{int(self.flood)}")
        return "-".join(parts)

    @classmethod
    def from_tag(cls, text: str) -> Fence:
        parts = set(text.split("-")) if text else set()
        learning = True if "L1" in parts else False if "L0" in parts else None
        flood = True if "F1" in parts else False if "F0" in parts else None
        return cls(
            mac_filtering="M" in parts, isolated="I" in parts, learning=learning, flood=flood
        )

    def describe(self) -> dict[str, bool]:
        """For the wire and the audit log: what this port may not do."""
        out = {"mac_filtering": self.mac_filtering, "port_isolation": self.isolated}
        if self.learning is not None:
            out["learning"] = self.learning
        if self.flood is not None:
            out["flood"] = self.flood
        return out
