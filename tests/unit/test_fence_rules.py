"""Guest MACs and port fences: pure logic (tapd.fence)."""

from __future__ import annotations

import pytest

from tapd import errors
from tapd.config import parse
from tapd.fence import (
    Fence,
    check_prefix,
    choose_mac,
    ifb_name,
    ifb_tap,
    parse_mac,
    parse_rate,
)
from tapd.owner import Peer
from tapd.policy import Policy


@pytest.mark.parametrize(
    ("text", "mac"),
    [("52:54:00:AB:cd:01", "52:54:00:ab:cd:01"), ("02:00:00:00:00:01", "02:00:00:00:00:01")],
)
def test_macs_are_read_in_lower_case(text: str, mac: str) -> None:
    assert parse_mac(text) == mac


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("52:54:00:12:34", "not a MAC"),
        ("52-54-00-12-34-56", "not a MAC"),
        ("52:54:00:12:34:5g", "not a MAC"),
        ("01:00:5e:00:00:01", "multicast"),
        ("ff:ff:ff:ff:ff:ff", "multicast"),
        ("00:00:00:00:00:00", "all-zero"),
        # the host side of tapd's taps: a tap at a guest's address is put back
        ("FE:54:00:12:34:56", "keeps for the host side of its taps"),
    ],
)
def test_a_guest_mac_must_be_a_unicast_address(text: str, why: str) -> None:
    with pytest.raises(errors.InvalidValue, match=why):
        parse_mac(text)


@pytest.mark.parametrize("prefix", ["52:54:00", "02", "0a:bc:de:f0:12"])
def test_prefixes_that_are_locally_administered_unicast(prefix: str) -> None:
    assert check_prefix(prefix.upper()) == prefix


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        ("00:16:3e", "not locally administered"),  # a vendor's OUI
        ("03:00", "multicast"),
        ("52:54:00:00:00:00", "one to five octets"),
        ("52:54:0", "one to five octets"),
        ("", "one to five octets"),
        ("fe:54", "keeps for the host side of its taps"),
    ],
)
def test_prefixes_that_could_collide_with_real_hardware_are_refused(prefix: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_prefix(prefix)


def test_a_drawn_mac_has_the_prefix_and_is_never_one_in_use() -> None:
    # 200 of the 256 addresses under this prefix: every draw still finds a free one
    taken: set[str] = set()
    for _ in range(200):
        mac = choose_mac(None, "52:54:00:ab:cd", taken)
        assert mac.startswith("52:54:00:ab:cd:")
        assert mac not in taken
        taken.add(mac)


def test_drawing_from_a_full_prefix_says_so() -> None:
    taken = {f"52:54:00:ab:cd:{b:02x}" for b in range(256)}
    with pytest.raises(errors.GuestMacInUse, match="no free guest MAC"):
        choose_mac(None, "52:54:00:ab:cd", taken)


def test_a_wanted_mac_is_given_unless_a_live_lease_has_it() -> None:
    assert choose_mac("52:54:00:00:00:AA", "52:54:00", set()) == "52:54:00:00:00:aa"
    with pytest.raises(errors.GuestMacInUse, match="already the guest MAC of a live lease"):
        choose_mac("52:54:00:00:00:AA", "52:54:00", {"52:54:00:00:00:aa"})


@pytest.mark.parametrize(
    ("fence", "flags", "tag"),
    [
        (Fence(), {}, ""),
        (Fence(mac_filtering=True), {"locked": True, "learning": False}, "M"),
        (Fence(isolated=True), {"isolated": True}, "I"),
        (
            Fence(mac_filtering=True, isolated=True, learning=True, flood=False),
            # a locked port must not learn: the guest would add addresses
            {"locked": True, "learning": False, "isolated": True, "unicast_flood": False},
            "M-I-L1-F0",
        ),
        (Fence(learning=False, flood=True), {"learning": False, "unicast_flood": True}, "L0-F1"),
    ],
)
def test_fences_become_port_flags_and_survive_the_lease_tag(
    fence: Fence, flags: dict[str, bool], tag: str
) -> None:
    assert fence.port_flags() == flags
    assert fence.tag() == tag
    assert Fence.from_tag(tag) == fence
    assert fence.wanted == bool(flags)


def test_the_allow_rule_that_grants_decides_the_fence() -> None:
    config = parse(
        """
[[allow]]
users = ["1000"]
bridges = ["tenants"]
mac_filtering = true
port_isolation = true
flood = false

[[allow]]
users = ["1000"]
bridges = ["lab"]
"""
    )
    policy = Policy(config)
    peer = Peer(uid=1000, gid=1000, pid=1)
    assert policy.check(peer, "tenants").fence == Fence(
        mac_filtering=True, isolated=True, flood=False
    )
    assert not policy.check(peer, "lab").fence.wanted


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("10Mbit", 10_000_000),
        ("500kbit", 500_000),
        ("1.5gbit", 1_500_000_000),
        ("8000bit", 8000),
        ("1mbps", 8_000_000),  # tc(8): bps is bytes a second
        (" 2 Mbit ", 2_000_000),
    ],
)
def test_rates_are_read_as_tc_writes_them(text: str, bits: int) -> None:
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["10", "10M", "fast", "-1mbit", "7999bit", "2tbit", "1e6bit"])
def test_rates_tc_would_not_take_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


def test_rates_ride_in_the_lease_tag() -> None:
    fence = Fence(mac_filtering=True, ingress=10_000_000, egress=2_000_000)
    assert fence.tag() == "M-i10000000-o2000000"
    assert Fence.from_tag(fence.tag()) == fence
    assert fence.shaped and fence.wanted and Fence(egress=8000).wanted
    assert fence.describe()["ingress_limit"] == 10_000_000


def test_a_rule_sets_rates_in_tcs_words() -> None:
    config = parse(
        """
[[allow]]
users = ["1000"]
bridges = ["*"]
ingress_limit = "10Mbit"
egress_limit = "500kbit"
"""
    )
    fence = Policy(config).check(Peer(uid=1000, gid=1000, pid=1), "br0").fence
    assert (fence.ingress, fence.egress) == (10_000_000, 500_000)
    with pytest.raises(Exception, match="not a rate"):
        parse('[[allow]]\nbridges = ["*"]\nusers = ["1"]\negress_limit = "lots"\n')


@pytest.mark.parametrize("index", [1, 4242, 2**31 - 1])
def test_ifb_names_fit_an_interface_name_and_name_their_tap(index: int) -> None:
    assert len(ifb_name(index)) <= 15
    assert ifb_tap(ifb_name(index)) == index


@pytest.mark.parametrize("name", ["tapdifb", "tapdifbxyz", "ifb0", "tapdifb123456789", "br0"])
def test_other_names_are_no_ifb_of_tapds(name: str) -> None:
    assert ifb_tap(name) is None


def test_guest_ips_are_needed_checked_and_unique_where_the_rule_filters() -> None:
    from tapd.fence import check_guest_ips

    ranges = ("10.0.0.0/24", "fd00::/64")
    assert check_guest_ips(["10.0.0.5", "FD00::5"], ranges, "allow[0]", set()) == (
        "10.0.0.5",
        "fd00::5",
    )
    with pytest.raises(errors.GuestIpsRequired, match=r'"guest_ips": \["10.0.0.1"\]'):
        check_guest_ips(None, ranges, "allow[0]", set())
    with pytest.raises(errors.Denied, match=r"outside what allow\[0\] allows"):
        check_guest_ips(["10.0.1.5"], ranges, "allow[0]", set())
    with pytest.raises(errors.InvalidValue, match="not an IP address"):
        check_guest_ips(["10.0.0.300"], ranges, "allow[0]", set())
    with pytest.raises(errors.GuestIpInUse):
        check_guest_ips(["10.0.0.5"], ranges, "allow[0]", {"10.0.0.5"})
    with pytest.raises(errors.GuestIpInUse):
        check_guest_ips(["10.0.0.5", "10.0.0.5"], ranges, "allow[0]", set())
    # a rule that filters nothing has nothing to hold addresses to
    assert check_guest_ips(None, (), "allow[0]", set()) == ()
    with pytest.raises(errors.NotApplicable):
        check_guest_ips(["10.0.0.5"], (), "allow[0]", set())


@pytest.mark.parametrize("spelling", ["fd00::5%1", "fd00::5%eth0", "fd00::5%x uid=0"])
def test_a_guest_ip_with_a_scope_is_refused_not_taken_for_another_address(spelling: str) -> None:
    # ipaddress keeps an IPv6 scope (RFC 4007 "%zone") in the address and in
    # its str(): "fd00::5%1" is inside fd00::/64 but not equal to a live
    # lease's "fd00::5", and nft drops the zone, so two leases would both
    # pass fd00::5; and whatever follows "%" would land in the lease tag.
    from tapd.fence import check_guest_ips

    with pytest.raises(errors.InvalidValue, match="scope"):
        check_guest_ips([spelling], ("fd00::/64",), "allow[0]", {"fd00::5"})


def test_the_nft_document_holds_the_guest_to_its_addresses() -> None:
    from tapd import nft

    doc = nft.lease_rules(41, "52:54:00:00:00:01", ("10.0.0.5", "fd00::5"))["nftables"]
    rules = [c["add"]["rule"] for c in doc if "rule" in c.get("add", {})]
    lease = [r for r in rules if r["chain"] == "lease-41"]
    # ARP sender MAC, ARP sender IP, no DHCP or DHCPv6 server, DHCP discover,
    # IPv4 source, IPv6 source, no RA or redirect, ND target, other types
    assert len(lease) == 10
    servers = [r["expr"] for r in lease if "sport" in repr(r)]
    assert [(e[1]["match"]["right"], e[-1]) for e in servers] == [
        (67, {"drop": None}),
        (547, {"drop": None}),
    ]
    assert all(r["expr"][-1] in ({"drop": None}, {"accept": None}) for r in lease)
    text = repr(lease)
    assert "52:54:00:00:00:01" in text and "10.0.0.5" in text and "fd00::5" in text
    assert "0xfd000000000000000000000000000005" in text  # the ND target, as a raw integer
    # the link-local address the guest's MAC gives it, and no other
    assert "fe80::5054:ff:fe00:1" in text and "fe80::/10" not in text
    removal = [c["delete"] for c in nft.remove_lease(41)["nftables"] if "delete" in c]
    assert removal[0]["element"]["elem"] == [41]
    assert removal[1]["chain"]["name"] == "lease-41"


def test_a_filtering_rule_holds_requested_guest_macs_to_the_prefix() -> None:
    # a sticky static entry holds the address for the lease's life: only
    # addresses the admin keeps for guests may be asked for
    assert choose_mac("52:54:00:aa:00:01", "52:54:00", set(), within_prefix=True)
    with pytest.raises(errors.Denied, match="not under 52:54:00"):
        choose_mac("02:11:22:33:44:55", "52:54:00", set(), within_prefix=True)
    assert choose_mac("02:11:22:33:44:55", "52:54:00", set()) == "02:11:22:33:44:55"


def test_a_link_local_guest_ip_needs_no_range() -> None:
    from tapd.fence import check_guest_ips

    assert check_guest_ips(["fe80::1234"], ("10.0.0.0/24",), "allow[0]", set()) == ("fe80::1234",)
