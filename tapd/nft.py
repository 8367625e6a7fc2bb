"""IP anti-spoofing for a guest, as nftables documents.  Pure: no I/O.

A rule with ``ip_ranges`` lets a guest use only the addresses its request
named (``guest_ips``, inside those ranges).  Frames from its tap pass through
one chain of the lease's own in the bridge family's table ``tapd``, reached
from the ``prerouting`` hook by a verdict map keyed on the input interface's
index.  Not its name: a client may ask for the name of a tap that just went,
and the removal of the old lease's filter (which runs when the kernel
announces the old tap's end) would then take the new lease's away.  An index
is not reused while the kernel hands out new ones.

* ARP: the sender hardware address must be the lease's ``guest_mac`` and the
  sender IP one of its IPv4 addresses (or 0.0.0.0, an RFC 5227 probe): no
  ARP reply for someone else's address;
* IPv4: the source must be one of its addresses (a DHCP discover from
  0.0.0.0 to port 67 passes); a guest is no DHCP server (nothing from UDP
  port 67: a rogue server's offer would name its own router and DNS);
* IPv6: the source must be one of its addresses, the link-local address its
  MAC gives it (EUI-64) or unspecified (DAD), and a neighbour
  advertisement's target one of those: no ND answer for someone else's
  address; a guest sends no router advertisement, no redirect and no
  DHCPv6 server's reply (nothing from UDP port 547);
* any other ethertype (VLAN tags included) is dropped.

The documents are nft's JSON (libnftables-json(5)), which the ``nft`` tool
from Debian's nftables package reads with ``-j -f -``: no ruleset text is
assembled by hand.  Each lease's document is one transaction.
"""

from __future__ import annotations

import ipaddress
from typing import Any

TABLE = "tapd"
_T = {"family": "bridge", "table": TABLE}


#: the verdict map from input interface index to lease chain
MAP = "taps"


def eui64_link_local(mac: str) -> ipaddress.IPv6Address:
    """The link-local address a NIC with ``mac`` forms by default (modified
    EUI-64, RFC 4291 appendix A: the universal/local bit flipped, ff:fe in
    the middle)."""
    octets = bytes.fromhex(mac.replace(":", ""))
    iid = bytes([octets[0] ^ 0x02]) + octets[1:3] + b"\xff\xfe" + octets[3:]
    return ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + iid)


def chain_name(ifindex: int) -> str:
    return f"lease-{ifindex}"


def _hex(address: ipaddress.IPv6Address) -> str:
    # A raw payload (the ND target) compares as a 128-bit integer, which nft's
    # JSON parser reads from a string, not a JSON number.
    return "0x" + address.packed.hex()


def _match(left: dict[str, Any], op: str, right: Any) -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _field(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def _protocol(name: str) -> dict[str, Any]:
    return _match({"meta": {"key": "protocol"}}, "==", name)


_DROP = {"drop": None}


def _jump(chain: str) -> dict[str, Any]:
    return {"jump": {"target": chain}}


def _base() -> list[dict[str, Any]]:
    """The table, the map and the hook: made or made again, never doubled."""
    return [
        {"add": {"table": {"family": "bridge", "name": TABLE}}},
        {"add": {"map": {**_T, "name": MAP, "type": "iface_index", "map": "verdict"}}},
        {
            "add": {
                "chain": {
                    **_T,
                    "name": "prerouting",
                    "type": "filter",
                    "hook": "prerouting",
                    "prio": -200,
                    "policy": "accept",
                }
            }
        },
        {"flush": {"chain": {**_T, "name": "prerouting"}}},
        {
            "add": {
                "rule": {
                    **_T,
                    "chain": "prerouting",
                    "expr": [{"vmap": {"key": {"meta": {"key": "iif"}}, "data": f"@{MAP}"}}],
                }
            }
        },
    ]


def lease_rules(ifindex: int, guest_mac: str | None, ips: tuple[str, ...]) -> dict[str, Any]:
    """The transaction that fences tap ``ifindex`` to ``ips`` (idempotent)."""
    addresses = [ipaddress.ip_address(ip) for ip in ips]
    v4 = sorted(str(a) for a in addresses if a.version == 4)
    v6 = [a for a in addresses if isinstance(a, ipaddress.IPv6Address)]
    chain = chain_name(ifindex)
    # Link-local IPv6: the address the guest forms from its MAC (EUI-64,
    # RFC 4291 appendix A), and any it named; never another's, such as the
    # router's fe80::1.
    own_v6 = [*v6]
    if guest_mac is not None:
        own_v6.append(eui64_link_local(guest_mac))
    own_v6 = sorted(set(own_v6))
    rules: list[list[dict[str, Any]]] = []
    if guest_mac is not None:
        rules.append(
            [_protocol("arp"), _match(_field("arp", "saddr ether"), "!=", guest_mac), _DROP]
        )
    rules.append(
        [_protocol("arp"), _match(_field("arp", "saddr ip"), "!=", {"set": [*v4, "0.0.0.0"]}),
         _DROP]
    )  # fmt: skip
    # A guest is no DHCP server (a relay's or server's messages come from
    # port 67, RFC 2131 section 4.1; DHCPv6's from 547, RFC 8415 section 7.2).
    rules.append([_protocol("ip"), _match(_field("udp", "sport"), "==", 67), _DROP])
    rules.append([_protocol("ip6"), _match(_field("udp", "sport"), "==", 547), _DROP])
    rules.append(
        [
            _match(_field("ip", "saddr"), "==", "0.0.0.0"),
            _match(_field("udp", "dport"), "==", 67),
            {"accept": None},
        ]
    )
    rules.append([_protocol("ip"), _match(_field("ip", "saddr"), "!=", {"set": v4}), _DROP]
                 if v4 else [_protocol("ip"), _DROP])  # fmt: skip
    rules.append(
        [_protocol("ip6"),
         _match(_field("ip6", "saddr"), "!=", {"set": [*map(str, own_v6), "::"]}), _DROP]
    )  # fmt: skip
    # A guest is no router: no router advertisement, no redirect.
    rules.append(
        [
            _protocol("ip6"),
            _match(_field("icmpv6", "type"), "==", {"set": ["nd-router-advert", "nd-redirect"]}),
            _DROP,
        ]
    )
    rules.append(
        [
            _protocol("ip6"),
            _match(_field("icmpv6", "type"), "==", "nd-neighbor-advert"),
            _match(
                {"payload": {"base": "th", "offset": 64, "len": 128}},  # the target address
                "!=",
                {"set": [*map(_hex, own_v6)]},
            ),
            _DROP,
        ]
    )
    rules.append(
        [_match({"meta": {"key": "protocol"}}, "!=", {"set": ["arp", "ip", "ip6"]}), _DROP]
    )
    doc: list[dict[str, Any]] = [
        *_base(),
        {"add": {"chain": {**_T, "name": chain}}},
        {"flush": {"chain": {**_T, "name": chain}}},
        *({"add": {"rule": {**_T, "chain": chain, "expr": expr}}} for expr in rules),
        # the same element added again (a restarted tapd) is no error
        {"add": {"element": {**_T, "name": MAP, "elem": [[ifindex, _jump(chain)]]}}},
    ]
    return {"nftables": doc}


def remove_lease(ifindex: int) -> dict[str, Any]:
    """The transaction that takes a lease's chain away (its map entry first).

    It holds whether they are there or not (a flushed ruleset, an earlier
    removal): each is added first, which does nothing to one that exists, so
    that its deletion cannot fail for want of it, and nft's "No such file or
    directory" never reaches the log for a filter already gone."""
    chain = chain_name(ifindex)
    return {
        "nftables": [
            *_base(),
            {"add": {"chain": {**_T, "name": chain}}},
            {"add": {"element": {**_T, "name": MAP, "elem": [[ifindex, _jump(chain)]]}}},
            {"delete": {"element": {**_T, "name": MAP, "elem": [ifindex]}}},
            {"delete": {"chain": {**_T, "name": chain}}},
        ]
    }


def leased_indexes(listing: dict[str, Any]) -> list[int]:
    """Interface indexes with a chain in ``nft -j list table bridge tapd``'s output."""
    indexes = []
    for item in listing.get("nftables", []):
        chain = item.get("chain")
        suffix = chain.get("name", "").removeprefix("lease-") if chain else ""
        if chain and chain["name"].startswith("lease-") and suffix.isdigit():
            indexes.append(int(suffix))
    return indexes
