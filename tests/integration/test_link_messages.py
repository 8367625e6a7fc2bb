"""tapd reads links from RTM_GETLINK messages it packs and parses itself (no
pyroute2 on the way to a first tap): what it reads of every kind of link it
meets is what pyroute2 reads of the same message."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

import pytest
from pyroute2 import NetNS
from tapdtest import ip, make_tap_in, netns

from tapd import netlink, tun

pytestmark = pytest.mark.root


@pytest.fixture
def zoo() -> Iterator[tuple[str, list[int]]]:
    """A namespace holding one of each kind of link tapd meets."""
    with netns("tapd-links-") as ns:
        ip("-n", ns, "link", "add", "br0", "type", "bridge")
        ip("-n", ns, "link", "add", "ifb7", "type", "ifb")
        ip("-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        fds = make_tap_in(ns, "single")
        fds += make_tap_in(ns, "multi", queues=3)
        fcntl.ioctl(fds[0], tun.TUNSETPERSIST, 1)
        tun.set_owner(fds[0], 4242)
        os.close(fds.pop())  # multi: two of three queues still open
        ip("-n", ns, "link", "set", "single", "master", "br0", "up")
        ip("-n", ns, "link", "set", "br0", "up")
        ip("-n", ns, "link", "set", "single", "alias", "tapd:lease=abc")
        try:
            yield ns, fds
        finally:
            tun.close_all(fds)


def test_every_link_reads_as_pyroute2_reads_it(zoo: tuple[str, list[int]]) -> None:
    ns, _ = zoo
    ours = _in_ns(ns)
    with NetNS(ns) as ipr:
        theirs = {int(m["index"]): m for m in ipr.link("dump")}
    assert {link.index for link in ours} == set(theirs)
    assert {link.name for link in ours} >= {"lo", "br0", "ifb7", "v0", "v1", "single", "multi"}
    for link in ours:
        msg = theirs[link.index]
        assert link.name == msg.get("IFLA_IFNAME")
        assert link.flags == msg["flags"]
        assert link.mtu == msg.get("IFLA_MTU")
        assert link.address == msg.get("IFLA_ADDRESS")
        assert link.master == msg.get("IFLA_MASTER")
        assert (link.alias or None) == (msg.get("IFLA_IFALIAS") or None)
        assert link.carrier == bool(msg.get("IFLA_CARRIER"))
        assert link.kind == msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
        data = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
        if link.kind == "tun":
            for attr, name in TUN_ATTRS.items():
                assert link.datum(attr) == (data.get(name) if data else None), (link.name, name)
        if link.kind == "bridge":
            assert link.datum(netlink.IFLA_BR_VLAN_FILTERING) == data.get("IFLA_BR_VLAN_FILTERING")
    by_name = {link.name: link for link in ours}
    single = netlink.TunInfo.from_link(by_name["single"])
    multi = netlink.TunInfo.from_link(by_name["multi"])
    assert single is not None and multi is not None
    assert (single.owner, single.persist, single.multi_queue, single.queues) == (
        4242,
        True,
        False,
        1,
    )
    assert (multi.multi_queue, multi.queues, multi.persist) == (True, 2, False)
    assert by_name["single"].alias == "tapd:lease=abc"
    assert netlink.TunInfo.from_link(by_name["br0"]) is None


TUN_ATTRS = {
    netlink.IFLA_TUN_OWNER: "IFLA_TUN_OWNER",
    netlink.IFLA_TUN_GROUP: "IFLA_TUN_GROUP",
    netlink.IFLA_TUN_TYPE: "IFLA_TUN_TYPE",
    netlink.IFLA_TUN_PI: "IFLA_TUN_PI",
    netlink.IFLA_TUN_VNET_HDR: "IFLA_TUN_VNET_HDR",
    netlink.IFLA_TUN_PERSIST: "IFLA_TUN_PERSIST",
    netlink.IFLA_TUN_MULTI_QUEUE: "IFLA_TUN_MULTI_QUEUE",
    netlink.IFLA_TUN_NUM_QUEUES: "IFLA_TUN_NUM_QUEUES",
    netlink.IFLA_TUN_NUM_DISABLED_QUEUES: "IFLA_TUN_NUM_DISABLED_QUEUES",
}


def test_a_lookup_by_name_or_index_and_a_removal(zoo: tuple[str, list[int]]) -> None:
    ns, _ = zoo
    found = _in_ns(ns, "lookups")
    assert found == ["br0 bridge", "single tun", "None", "None", "True", "False", "None"]


def _in_ns(ns: str, what: str = "dump") -> list[netlink.Link] | list[str]:
    """Run the reading in a process that has joined ``ns`` (a thread's socket
    lives in the namespace it was made in)."""
    import pickle
    import subprocess
    import sys

    code = f"""
import pickle, sys
from tapd import netlink
nl = netlink.Netlink()
if {what!r} == "dump":
    out = nl.links()
else:
    br = nl.link(name="br0"); single = nl.link(index=nl.link(name="single").index)
    out = [f"{{br.name}} {{br.kind}}", f"{{single.name}} {{single.kind}}",
           str(nl.link(name="nosuch0")), str(nl.link(index=999999)),
           str(nl.delete(nl.link(name="ifb7").index)), str(nl.delete(999999)),
           str(nl.link(name="ifb7"))]
sys.stdout.buffer.write(pickle.dumps(out))
"""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    result: list[netlink.Link] | list[str] = pickle.loads(out)
    return result
