"""The pure judgements in tapd.taps: has someone slipped a queue into a tap
tapd made, and may a client's tap be adopted."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import pytest

from tapd import netlink
from tapd.netlink import TapLink, TunInfo, pin_address
from tapd.taps import TapSpec, adoption_problem, intrusion

MADE = TunInfo(owner=1000, group=None, persist=False, multi_queue=True, queues=4, disabled=0)
SPEC = TapSpec(bridge="br0", ifname=None, queues=4, owner_uid=1000)


def test_a_tap_holding_exactly_what_tapd_made_is_clean() -> None:
    assert intrusion(MADE, SPEC) is None
    grouped = dataclasses.replace(MADE, group=50)
    assert intrusion(grouped, dataclasses.replace(SPEC, owner_gid=50)) is None


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"queues": 5}, "holds 5 queues (5 attached, 0 disabled) where tapd made 4"),
        # A queue detached with TUNSETQUEUE is still someone's.
        ({"queues": 4, "disabled": 1}, "holds 5 queues (4 attached, 1 disabled)"),
        ({"owner": 65534}, "its owner is uid 65534"),
        ({"group": 65534}, "group 65534"),
        ({"persist": True}, "persistent"),
    ],
)
def test_anything_more_than_tapd_made_is_an_intrusion(change: dict[str, Any], says: str) -> None:
    problem = intrusion(dataclasses.replace(MADE, **change), SPEC)
    assert problem is not None and says in problem


def test_a_tap_gone_before_it_was_counted_is_an_intrusion() -> None:
    assert intrusion(None, SPEC) is not None


def _tun(**change: Any) -> TapLink:
    return dataclasses.replace(FRESH, tun=dataclasses.replace(FRESH.tun, **change))


FRESH = TapLink(
    name="vmtap",
    master=None,
    up=False,
    tun=TunInfo(owner=1000, group=None, persist=False, multi_queue=False, queues=1, disabled=0),
)


def test_a_tap_fresh_from_its_makers_tunsetiff_may_be_adopted() -> None:
    assert adoption_problem("vmtap", FRESH, 1000) is None


@pytest.mark.parametrize(
    ("link", "says"),
    [
        (None, "vanished"),
        (_tun(owner=None), "nobody"),
        (_tun(owner=0), "uid 0"),
        (dataclasses.replace(FRESH, master=7), "already a port"),
        (dataclasses.replace(FRESH, up=True), "is up"),
        (_tun(persist=True), "persistent"),
    ],
)
def test_a_tap_its_requester_cannot_just_have_made_is_refused(
    link: TapLink | None, says: str
) -> None:
    problem = adoption_problem("vmtap", link, 1000)
    assert problem is not None and says in problem and "'vmtap'" in problem


def _link_message(kind: str, data: dict[int, bytes], **attrs: bytes) -> bytes:
    """An RTM_NEWLINK's payload as the kernel packs it: ifinfomsg, then
    attributes, IFLA_LINKINFO nested (with NLA_F_NESTED) around the kind's."""
    nested = 0x8000
    info_data = b"".join(netlink._nla(k, v) for k, v in data.items())
    linkinfo = netlink._nla(netlink.IFLA_INFO_KIND, kind.encode() + b"\0") + netlink._nla(
        netlink.IFLA_INFO_DATA | nested, info_data
    )
    body = b"".join(netlink._nla(getattr(netlink, k), v) for k, v in attrs.items())
    return (
        netlink._IFINFOMSG.pack(0, 1, 7, 0x1043, 0)
        + body
        + netlink._nla(netlink.IFLA_LINKINFO | nested, linkinfo)
    )


def test_tun_info_reads_what_tun_fill_info_reports() -> None:
    u8, u32 = (lambda v: bytes([v])), (lambda v: v.to_bytes(4, sys.byteorder))
    data = {
        netlink.IFLA_TUN_OWNER: u32(1000),
        netlink.IFLA_TUN_PERSIST: u8(0),
        netlink.IFLA_TUN_MULTI_QUEUE: u8(1),
        netlink.IFLA_TUN_NUM_QUEUES: u32(3),
        netlink.IFLA_TUN_NUM_DISABLED_QUEUES: u32(1),
    }
    link = netlink.Link.parse(
        _link_message("tun", data, IFLA_IFNAME=b"vm0\0", IFLA_MTU=u32(1500),
                      IFLA_ADDRESS=bytes.fromhex("fe4100000001"), IFLA_MASTER=u32(3))
    )  # fmt: skip
    assert (link.index, link.flags, link.name, link.mtu) == (7, 0x1043, "vm0", 1500)
    assert (link.address, link.master, link.alias) == ("fe:41:00:00:00:01", 3, None)
    assert link.kind == "tun"
    assert TunInfo.from_link(link) == TunInfo(
        owner=1000, group=None, persist=False, multi_queue=True, queues=3, disabled=1
    )
    assert TunInfo.from_link(netlink.Link.parse(_link_message("bridge", {}))) is None


# -- the address a bridge is pinned at ------------------------------------------------

RANDOM = bytes([0xFF, 1, 2, 3, 4, 5])


@pytest.mark.parametrize("mac", ["32:02:f6:22:2b:9d", "fe:00:00:00:00:01", "00:00:00:00:00:01"])
def test_a_bridge_keeps_the_address_it_has(mac: str) -> None:
    current = bytes.fromhex(mac.replace(":", ""))
    assert pin_address(current, RANDOM) == current


@pytest.mark.parametrize("mac", ["00:00:00:00:00:00", "01:00:5e:00:00:01"])
def test_a_bridge_without_a_usable_address_gets_a_random_local_unicast_one(mac: str) -> None:
    pinned = pin_address(bytes.fromhex(mac.replace(":", "")), RANDOM)
    # eth_random_addr(): multicast bit clear, locally administered bit set
    assert pinned == bytes([0xFE, 1, 2, 3, 4, 5])
