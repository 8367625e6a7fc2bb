"""Which rtnetlink messages tapd takes for a link's end or a tap's last queue."""

from __future__ import annotations

import struct

import pytest

from tapd import netlink
from tapd.netlink import LinkEvent

AF_BRIDGE = 7


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _message(kind: int, family: int, index: int, flags: int, attrs: bytes = b"") -> bytes:
    body = struct.pack("=BxHiII", family, 0, index, flags, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def _port(address: str, master: bool = True) -> bytes:
    """A link's name, address and master, as rtnl_fill_ifinfo() puts them."""
    attrs = _attr(3, b"tap0\0") + _attr(netlink.IFLA_ADDRESS, bytes.fromhex(address))
    return attrs + (_attr(netlink.IFLA_MASTER, struct.pack("=I", 2)) if master else b"")


def _events(*messages: bytes) -> list[tuple[LinkEvent, int]]:
    seen: list[tuple[LinkEvent, int]] = []
    netlink._report(b"".join(messages), lambda kind, index: seen.append((kind, index)))
    return seen


UP, LOWER_UP = netlink.IFF_UP, netlink.IFF_LOWER_UP


@pytest.mark.parametrize(
    ("kind", "family", "flags", "expected"),
    [
        (netlink.RTM_DELLINK, 0, 0, [(LinkEvent.REMOVED, 7)]),
        # The bridge's word about a port that left it: the tap lives on.
        (netlink.RTM_DELLINK, AF_BRIDGE, UP, []),
        # An up tap whose carrier went: its last queue closed.
        (netlink.RTM_NEWLINK, 0, UP, [(LinkEvent.IDLE, 7)]),
        (netlink.RTM_NEWLINK, AF_BRIDGE, UP, []),
        (netlink.RTM_NEWLINK, 0, UP | LOWER_UP, []),
        (netlink.RTM_NEWLINK, 0, 0, []),  # a tap being made, still down
    ],
)
def test_what_is_reported(kind: int, family: int, flags: int, expected: list[object]) -> None:
    assert _events(_message(kind, family, 7, flags)) == expected


@pytest.mark.parametrize(
    ("flags", "attrs", "expected"),
    [
        # a port's holder set its address to a guest's: the bridge took it
        (UP | LOWER_UP, _port("525400aabbcc"), [(LinkEvent.ADDRESS, 7)]),
        (0, _port("525400aabbcc"), [(LinkEvent.ADDRESS, 7)]),  # down: still a port
        (UP, _port("525400aabbcc"), [(LinkEvent.IDLE, 7), (LinkEvent.ADDRESS, 7)]),
        (UP | LOWER_UP, _port("fe7a00aabbcc"), []),  # an address tapd gives taps
        # another fe: address (a neighbour's, libvirt's fe:54:..): not tapd's
        (UP | LOWER_UP, _port("fe5400aabbcc"), [(LinkEvent.ADDRESS, 7)]),
        (UP | LOWER_UP, _port("525400aabbcc", master=False), []),  # nobody's port
    ],
)
def test_a_ports_new_address(flags: int, attrs: bytes, expected: list[object]) -> None:
    assert _events(_message(netlink.RTM_NEWLINK, 0, 7, flags, attrs)) == expected


def test_several_messages_in_one_read() -> None:
    got = _events(
        _message(netlink.RTM_NEWLINK, 0, 3, UP),
        _message(netlink.RTM_DELLINK, AF_BRIDGE, 3, UP),
        _message(netlink.RTM_DELLINK, 0, 3, 0),
    )
    assert got == [(LinkEvent.IDLE, 3), (LinkEvent.REMOVED, 3)]


def test_the_flag_bytes_the_filter_loads() -> None:
    # ifi_flags sits 8 bytes into the ifinfomsg, after the 16-byte header;
    # on a little-endian host IFF_UP is in its first byte, IFF_LOWER_UP
    # (0x10000) in its third.
    flags = struct.pack("=I", UP | LOWER_UP)
    for bit in (UP, LOWER_UP):
        offset, mask = netlink._flag_byte(bit)
        assert flags[offset - 24] & mask
