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
* ``vlan`` / ``vlan_tagged`` (on a bridge with ``vlan_filtering``): the port
  is an untagged member of one access VLAN alone (its PVID, egress untagged;
  the bridge's default VLAN taken off it), and a tagged member of each VLAN in
  ``vlan_tagged`` (a trunk).  With VLAN filtering the FDB is per VLAN, so
  ``mac_filtering``'s static entry goes in the access VLAN: that is the VLAN
  a locked port looks a frame's source up in (br_handle_frame_finish()).
* ``ingress_limit`` / ``egress_limit``: what the guest may receive and send,
  in bits a second, shaped with the kernel's token bucket filter (``tbf``).
  What the guest receives leaves the host through the tap, so its ``tbf`` is
  the tap's root qdisc.  What the guest sends arrives on the tap, and this
  kernel has no ingress policer (no ``police`` action, no ``matchall``): it is
  redirected (``u32`` match-all, ``mirred``) to an ``ifb`` device of the
  lease's own, whose root qdisc is the second ``tbf``.

The guest's MAC is tapd's, not QEMU's, idea: every grant carries one
(``guest_mac``), the request's own if it asked for a free one, else one tapd
draws under a locally administered prefix, unique among live leases.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Container
from dataclasses import dataclass

from .errors import (
    Denied,
    GuestIpInUse,
    GuestIpsRequired,
    GuestMacInUse,
    InvalidValue,
    NotApplicable,
    VlanNotConfigured,
    VlanNotPermitted,
)

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_PREFIX = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){0,4}")

#: QEMU's own prefix for NICs (qemu_macaddr_default_if_unset), locally administered
DEFAULT_PREFIX = "52:54:00"

#: how often to draw again when a drawn address is in use
_DRAWS = 64

#: The first octet of every address tapd gives a tap (tapd.taps.random_mac),
#: and of no guest's: a VMM may set its tap's address through its fd, and a
#: bridge port's own address displaces any FDB entry for it, a fenced guest's
#: static one too (net/bridge/br_fdb.c: fdb_add_local()).  tapd puts back any
#: tap address outside this octet (tapd.lifecycle), so guest MACs stay out of it.
TAP_OCTET = 0xFE
#: The first two octets of every address tapd gives a tap: the octet after
#: 0xFE narrows what tapd takes for its own, so that a holder that sets its
#: tap to some other 0xFE address (a neighbour's across the uplink; libvirt's
#: host-side taps are fe:54:..., Xen's fe:ff:...) is put back too.
TAP_PREFIX = bytes([TAP_OCTET, 0x7A])


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
    if first == TAP_OCTET:
        raise InvalidValue(
            f"{what}: {text} starts with {TAP_OCTET:02x}, which tapd keeps for the host side "
            "of its taps; a guest needs another address"
        )
    return mac


def check_prefix(prefix: str) -> str:
    """A ``guest_mac_prefix``: one to five octets, unicast, locally administered."""
    value = prefix.lower()
    if not _PREFIX.fullmatch(value):
        raise ValueError(f'{prefix!r} is not one to five octets like "52:54:00"')
    first = int(value[:2], 16)
    if first & 1:
        raise ValueError(f"{prefix} starts a multicast address")
    if first == TAP_OCTET:
        raise ValueError(
            f"{prefix} starts with {TAP_OCTET:02x}, which tapd keeps for the host side of its "
            "taps; guests need another prefix"
        )
    if not first & 2:
        raise ValueError(
            f"{prefix} is not locally administered (the first octet needs bit 0x02): "
            "tapd must not draw addresses that belong to a vendor"
        )
    return value


def choose_mac(
    wanted: str | None, prefix: str, taken: Container[str], within_prefix: bool = False
) -> str:
    """The guest MAC for a new lease: ``wanted`` if free, else a fresh one
    under ``prefix`` that no live lease has.  ``within_prefix`` (a rule that
    filters MACs): ``wanted`` too must be under ``prefix``, the addresses the
    admin keeps for guests, since its static, sticky FDB entry holds that
    address on this port for the lease's life, whoever else has it."""
    if wanted is not None:
        mac = parse_mac(wanted)
        if within_prefix and not mac.startswith(prefix + ":"):
            raise Denied(
                f"guest_mac {mac} is not under {prefix}, the guest MACs this bridge's rule "
                "holds for guests; leave guest_mac out and tapd picks one"
            )
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


_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(bit|bps)", re.IGNORECASE)
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_rate(text: str) -> int:
    """A rate as tc(8) writes it ("10Mbit", "500kbit", "1.5mbps": bit for
    bits, bps for bytes, decimal prefixes) in bits a second."""
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f'{text!r} is not a rate like "10Mbit" or "500kbit"')
    number, prefix, unit = match.groups()
    bits = float(number) * _SCALE[prefix.lower()] * (8 if unit.lower() == "bps" else 1)
    if not 8_000 <= bits <= 10**12:
        raise ValueError(f"{text!r} is outside 8kbit..1Tbit")
    return int(bits)


def ifb_name(index: int) -> str:
    """The ifb device that shapes what the guest on tap ``index`` sends: named
    from the tap's index (never reused while the tap lives), so that a
    restarted tapd finds it, and an orphan, without a record of its own."""
    return f"{IFB_PREFIX}{index:x}"


def ifb_tap(name: str) -> int | None:
    """The tap index an ifb name of :func:`ifb_name`'s stands for, or None."""
    suffix = name.removeprefix(IFB_PREFIX)
    if suffix == name or not suffix or len(suffix) > 8:
        return None
    try:
        return int(suffix, 16)
    except ValueError:
        return None


#: ifb devices tapd makes are named this and the tap's index in hex (an
#: ifindex is an int: at most 8 hex digits, 15 bytes in all, IFNAMSIZ)
IFB_PREFIX = "tapdifb"


@dataclass(frozen=True)
class Fence:
    """The port flags an allow rule asks for (None: leave the kernel's default)
    and the rates it allows, in bits a second (None: unlimited)."""

    mac_filtering: bool = False
    isolated: bool = False
    learning: bool | None = None
    flood: bool | None = None
    ingress: int | None = None  # to the guest
    egress: int | None = None  # from the guest
    #: the rule has ip_ranges: the tap passes only the lease's guest_ips (nft)
    ip_filter: bool = False
    #: the access VLAN the port is an untagged member of (None: the bridge's
    #: own default; a rule's VLANs are a choice, the lease's fence holds one)
    vlan: int | None = None
    #: VLANs the port carries tagged (a trunk)
    vlan_tagged: tuple[int, ...] = ()

    @property
    def wanted(self) -> bool:
        return bool(self.port_flags()) or self.shaped or self.ip_filter or self.vlans

    @property
    def vlans(self) -> bool:
        """The port's VLANs are tapd's to set (else the bridge's default)."""
        return self.vlan is not None or bool(self.vlan_tagged)

    @property
    def shaped(self) -> bool:
        return self.ingress is not None or self.egress is not None

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
        if self.ingress is not None:
            parts.append(f"i{self.ingress}")
        if self.egress is not None:
            parts.append(f"o{self.egress}")
        if self.ip_filter:
            parts.append("P")
        if self.vlan is not None:
            parts.append(f"V{self.vlan}")
        if self.vlan_tagged:
            parts.append("T" + trunk_tag(self.vlan_tagged))
        return "-".join(parts)

    @classmethod
    def from_tag(cls, text: str) -> Fence:
        parts = set(text.split("-")) if text else set()
        learning = True if "L1" in parts else False if "L0" in parts else None
        flood = True if "F1" in parts else False if "F0" in parts else None
        rates = {p[0]: int(p[1:]) for p in parts if p[:1] in ("i", "o") and p[1:].isdigit()}
        vlan = next((_vid(p[1:]) for p in parts if p[:1] == "V"), None)
        trunk = next((p[1:] for p in parts if p[:1] == "T"), "")
        tagged = _trunk_vids(trunk)
        return cls(
            mac_filtering="M" in parts,
            isolated="I" in parts,
            learning=learning,
            flood=flood,
            ingress=rates.get("i"),
            egress=rates.get("o"),
            ip_filter="P" in parts,
            vlan=vlan,
            vlan_tagged=tagged,
        )

    def on_wire(self) -> dict[str, bool | int] | None:
        """:meth:`describe`, or None when the port is not fenced: a port that
        only has VLANs shows them as the lease's own ``vlan``/``vlan_tagged``."""
        return (
            self.describe()
            if self.wanted and self != Fence(vlan=self.vlan, vlan_tagged=self.vlan_tagged)
            else None
        )

    def describe(self) -> dict[str, bool | int]:
        """For the wire and the audit log: what this port may not do."""
        out: dict[str, bool | int] = {
            "mac_filtering": self.mac_filtering,
            "port_isolation": self.isolated,
        }
        if self.learning is not None:
            out["learning"] = self.learning
        if self.flood is not None:
            out["flood"] = self.flood
        if self.ingress is not None:
            out["ingress_limit"] = self.ingress
        if self.egress is not None:
            out["egress_limit"] = self.egress
        if self.ip_filter:
            out["ip_filtering"] = True
        return out


#: IEEE 802.1Q: VLAN ids 0 and 4095 are reserved
VLAN_IDS = range(1, 4095)


def _vid(text: str) -> int | None:
    """A VLAN id from a lease tag; None for anything else (a tag is read from
    an interface alias, which anyone with CAP_NET_ADMIN may have written)."""
    if not text.isascii() or not text.isdigit() or int(text) not in VLAN_IDS:
        return None
    return int(text)


def trunk_tag(vids: tuple[int, ...]) -> str:
    """A trunk's VLANs for the lease tag, runs of consecutive ids as ``a~b``
    ("10~20.30"): an interface alias holds 255 bytes, and a trunk of 1-4094
    must fit."""
    runs: list[list[int]] = []
    for vid in sorted(set(vids)):
        if runs and vid == runs[-1][1] + 1:
            runs[-1][1] = vid
        else:
            runs.append([vid, vid])
    return ".".join(str(a) if a == b else f"{a}~{b}" for a, b in runs)


def _trunk_vids(text: str) -> tuple[int, ...]:
    """The VLANs of a :func:`trunk_tag`; what is no VLAN id or run is left out."""
    found: list[int] = []
    for part in text.split(".") if text else ():
        first, _, last = part.partition("~")
        a, b = _vid(first), _vid(last or first)
        if a is not None and b is not None and a <= b:
            found.extend(range(a, b + 1))
    return tuple(sorted(set(found)))


def choose_vlan(wanted: int | None, permitted: tuple[int, ...], rule: str) -> int | None:
    """The access VLAN of a new lease: ``wanted`` if its rule permits it, the
    rule's first (its default) when the request names none, None when the
    rule puts its taps in no VLAN (then ``wanted`` cannot apply)."""
    if not permitted:
        if wanted is not None:
            raise VlanNotConfigured(
                f"vlan: {rule} puts its taps in no VLAN, so there is none to choose; "
                "leave vlan out (or ask the administrator for a rule with vlan)"
            ).about(rule=rule)
        return None
    if wanted is None:
        return permitted[0]
    if wanted not in permitted:
        listed = ", ".join(str(v) for v in permitted)
        raise VlanNotPermitted(
            f"vlan: {wanted} is not a VLAN {rule} permits ({listed}); ask for one of "
            f"those, or leave vlan out for {permitted[0]}"
        ).about(rule=rule)
    return wanted


def check_not_the_hosts(ips: tuple[str, ...], host: list[tuple[str, int]], bridge: str) -> None:
    """Refuse a guest address that is the host's own on the bridge (the
    router's or the DNS's, to the other guests), or the network or broadcast
    address of an IPv4 subnet the host has there."""
    nets = [ipaddress.ip_interface(f"{address}/{length}") for address, length in host]
    for text in ips:
        address = ipaddress.ip_address(text)
        for own in nets:
            if address == own.ip:
                raise GuestIpInUse(
                    f"guest_ips: {address} is the host's own address on bridge {bridge!r} "
                    "(its router or server, to the guests); give the guest another"
                )
            network = own.network
            if (
                address.version == 4 == network.version
                and network.prefixlen < 31
                and address in (network.network_address, network.broadcast_address)
            ):
                raise InvalidValue(
                    f"guest_ips: {address} is the network or broadcast address of "
                    f"{network}, the host's subnet on bridge {bridge!r}; no guest's"
                )


def check_guest_ips(
    wanted: list[str] | None, ranges: tuple[str, ...], rule: str, taken: Container[str]
) -> tuple[str, ...]:
    """The addresses a lease may use: none without ``ranges``; with them, the
    request must name its guest's addresses, each inside one of the ranges
    and no live lease's."""
    if not ranges:
        if wanted:
            raise NotApplicable(
                f"guest_ips: {rule} filters no addresses, so there is nothing to fence "
                "them with; leave guest_ips out"
            )
        return ()
    if not wanted:
        raise GuestIpsRequired(
            f"{rule} lets a guest use only addresses it names: give guest_ips, e.g. "
            f'"guest_ips": ["{ipaddress.ip_network(ranges[0])[1]}"], from {", ".join(ranges)}'
        )
    networks = [ipaddress.ip_network(r) for r in ranges]
    found: list[str] = []
    for text in wanted:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise InvalidValue(f"guest_ips: {text!r} is not an IP address") from None
        if getattr(address, "scope_id", None) is not None:
            # ipaddress keeps an RFC 4007 zone ("%1") in the address and its
            # str(), so "fd00::5%1" would not equal a live lease's "fd00::5"
            # though nft filters both as fd00::5, and the zone's text would
            # land in the lease tag.
            raise InvalidValue(f"guest_ips: {text!r} has a scope (%zone); give the address alone")
        # An IPv6 link-local address is the link's, not a range's: a guest
        # whose link-local is not the one its MAC gives (stable privacy) names it.
        link_local = address.version == 6 and address.is_link_local
        if not link_local and not any(address in network for network in networks):
            raise Denied(
                f"guest_ips: {address} is outside what {rule} allows ({', '.join(ranges)})"
            ).about(rule=rule)
        if str(address) in taken or str(address) in found:
            raise GuestIpInUse(f"guest_ips: {address} is already a live lease's address")
        found.append(str(address))
    return tuple(found)
