"""VLAN per tap on a bridge that filters VLANs, in a kernel that has them
(Debian's 6.1: this machine's own has no CONFIG_BRIDGE_VLAN_FILTERING).

Frames are written into tap fds and read from others, as the fence tests do:
no guest needed.  A frame written into a tap is carried through the bridge
in the writer's own system call (tun_get_user() hands it to
netif_receive_skb() with bottom halves off, and the bridge queues it on every
port it forwards to before returning), so once write() is back, whatever
will reach a port's queue is there: reading until EAGAIN sees it all.

One daemon serves the module (Python under TCG is slow); the restart test
runs its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tapdtest import (
    Daemon,
    ip,
    links,
    make_tap_in,
    netns,
    redirect_target,
    run_daemon,
    taps,
    wait_until,
)

from tapd import client

pytestmark = [pytest.mark.root, pytest.mark.kernel_stage, pytest.mark.vlan_filtering]

CONFIG = """
[taps]
guest_mac_prefix = "52:54:00:7b"

# access ports in VLAN 10 (the default) or 20
[[allow]]
users = ["0"]
bridges = ["br0"]
vlan = [10, 20]

# a trunk, on a bridge whose uplink carries br0's VLANs tagged
[[allow]]
users = ["0"]
bridges = ["br1"]
vlan_tagged = [10, 20]
port_isolation = true

# fenced access ports
[[allow]]
users = ["0"]
bridges = ["br2"]
vlan = 10
mac_filtering = true
port_isolation = true

# VLANs on a bridge that does not filter them
[[allow]]
users = ["0"]
bridges = ["br3"]
vlan = 10

# no VLANs
[[allow]]
users = ["0"]
bridges = ["br4"]
"""

#: IEEE 802: the local experimental ethertype, so that no frame the kernel
#: sends by itself (IPv6 router solicitations, MLD) is taken for a test's
ETHERTYPE = b"\x88\xb5"
BROADCAST = b"\xff" * 6


def _kernel_filters_vlans() -> bool:
    with netns("tapd-k-") as ns:
        made = ip("-n", ns, "link", "add", "probe0", "type", "bridge", "vlan_filtering", "1",
                  check=False)  # fmt: skip
        return made.returncode == 0


@pytest.fixture(scope="module", autouse=True)
def _a_vlan_kernel() -> None:
    if os.geteuid() == 0 and not _kernel_filters_vlans():
        pytest.skip(
            "this kernel has no bridge VLAN filtering: tests/kernel runs in the kernel stage"
        )


@pytest.fixture(scope="module")
def vns() -> Iterator[str]:
    with netns("tapd-v-") as ns:
        for bridge in ("br0", "br1", "br2", "br4"):
            ip("-n", ns, "link", "add", bridge, "type", "bridge", "vlan_filtering", "1")
        ip("-n", ns, "link", "add", "br3", "type", "bridge")
        # br0's uplink to br1: a veth trunk of VLANs 10 and 20
        ip("-n", ns, "link", "add", "up0", "type", "veth", "peer", "name", "up1")
        for end, bridge in (("up0", "br0"), ("up1", "br1")):
            ip("-n", ns, "link", "set", end, "master", bridge)
            bridge_cmd(ns, "vlan", "del", "dev", end, "vid", "1")
            for vid in ("10", "20"):
                bridge_cmd(ns, "vlan", "add", "dev", end, "vid", vid)
            ip("-n", ns, "link", "set", end, "up")
        for bridge in ("br0", "br1", "br2", "br3", "br4"):
            ip("-n", ns, "link", "set", bridge, "up")
        yield ns


@pytest.fixture(scope="module")
def tapd(vns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with run_daemon(vns, tmp_path_factory.mktemp("tapd"), CONFIG) as daemon:
        yield daemon


def bridge_cmd(ns: str, *args: str) -> str:
    return subprocess.run(
        ["bridge", "-n", ns, *args], capture_output=True, text=True, check=True
    ).stdout


def port_vlans(ns: str, dev: str) -> dict[int, set[str]]:
    """vid -> its flags ("PVID", "Egress Untagged") on port ``dev``."""
    out = json.loads(bridge_cmd(ns, "-j", "vlan", "show", "dev", dev) or "[]")
    return {v["vlan"]: set(v.get("flags", [])) for entry in out for v in entry["vlans"]}


ACCESS = {"PVID", "Egress Untagged"}


def frame(src: str, marker: bytes, vid: int | None = None) -> bytes:
    tag = b"" if vid is None else b"\x81\x00" + vid.to_bytes(2, "big")
    return BROADCAST + bytes.fromhex(src.replace(":", "")) + tag + ETHERTYPE + marker.ljust(46)


def heard(fd: int) -> list[tuple[int | None, bytes]]:
    """(VLAN tag or None, marker) of every test frame queued on a tap fd."""
    found: list[tuple[int | None, bytes]] = []
    os.set_blocking(fd, False)
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return found
        vid = None
        if data[12:14] == b"\x81\x00":
            vid = int.from_bytes(data[14:16], "big") & 0xFFF
            data = data[:12] + data[16:]
        if data[12:14] == ETHERTYPE:
            found.append((vid, data[14:].rstrip(b" ")))


@contextlib.contextmanager
def granted(daemon: Daemon, **options: Any) -> Iterator[client.TapGrant]:
    with daemon.request(vnet_hdr=False, **options) as grant:
        yield grant


def test_access_taps_reach_their_vlan_alone_and_a_trunk_sees_both_tagged(
    tapd: Daemon, vns: str
) -> None:
    with (
        granted(tapd, br="br0") as a1,
        granted(tapd, br="br0", vlan=10) as a2,
        granted(tapd, br="br0", vlan=20) as b1,
        granted(tapd, br="br0", vlan=20) as b2,
        granted(tapd, br="br1") as trunk,
    ):
        assert (a1.reply["vlan"], b1.reply["vlan"]) == (10, 20)
        assert trunk.reply["vlan_tagged"] == [10, 20]
        # Untagged members of their VLAN alone: the default VLAN 1 is gone.
        assert port_vlans(vns, a1.ifname) == {10: ACCESS}
        assert port_vlans(vns, b1.ifname) == {20: ACCESS}
        assert port_vlans(vns, trunk.ifname) == {10: set(), 20: set()}
        os.write(a1.tap_fds[0], frame("52:54:00:7b:00:01", b"ten"))
        os.write(b1.tap_fds[0], frame("52:54:00:7b:00:02", b"twenty"))
        assert heard(a2.tap_fds[0]) == [(None, b"ten")]
        assert heard(b2.tap_fds[0]) == [(None, b"twenty")]
        assert heard(trunk.tap_fds[0]) == [(10, b"ten"), (20, b"twenty")]
        # What the trunk sends tagged reaches that VLAN's access ports untagged.
        os.write(trunk.tap_fds[0], frame("52:54:00:7b:00:03", b"to-twenty", vid=20))
        os.write(trunk.tap_fds[0], frame("52:54:00:7b:00:03", b"untagged"))
        assert heard(b1.tap_fds[0]) == heard(b2.tap_fds[0]) == [(None, b"to-twenty")]
        assert heard(a1.tap_fds[0]) == heard(a2.tap_fds[0]) == []
        # list shows each lease's VLANs
        by_name = {x["ifname"]: x for x in tapd.leases()}
        assert by_name[a1.ifname]["vlan"] == 10 and by_name[b1.ifname]["vlan"] == 20
        assert sorted(by_name[trunk.ifname]["vlan_tagged"]) == [10, 20]
        out = subprocess.run(
            [sys.executable, "-m", "tapd.tapctl", "--socket",
             tapd.socket_path, "list"], capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "VLAN" in out.splitlines()[0] and "t10,20" in out


def test_a_fenced_access_port_stops_a_spoofing_guest_and_isolation_holds(
    tapd: Daemon, vns: str
) -> None:
    # A plain port of the bridge's in VLAN 10, not isolated: what reaches it
    # is what the fence let through.
    (observer,) = make_tap_in(vns, "obs0", vnet_hdr=False)
    try:
        ip("-n", vns, "link", "set", "obs0", "master", "br2", "up")
        bridge_cmd(vns, "vlan", "del", "dev", "obs0", "vid", "1")
        bridge_cmd(vns, "vlan", "add", "dev", "obs0", "vid", "10", "pvid", "untagged")
        with granted(tapd, br="br2") as c1, granted(tapd, br="br2") as c2:
            assert port_vlans(vns, c1.ifname) == {10: ACCESS}
            fdb = json.loads(bridge_cmd(vns, "-j", "fdb", "show", "dev", c1.ifname))
            statics = [e for e in fdb if e.get("state") == "static" and e.get("master")]
            assert [(e["mac"], e.get("vlan")) for e in statics] == [(c1.guest_mac, 10)]
            assert c1.guest_mac is not None
            os.write(c1.tap_fds[0], frame(c1.guest_mac, b"genuine"))
            os.write(c1.tap_fds[0], frame("52:54:00:7b:99:99", b"spoofed"))
            # the guest's own MAC, tagged into another VLAN: not this port's
            os.write(c1.tap_fds[0], frame(c1.guest_mac, b"hopped", vid=20))
            assert heard(observer) == [(None, b"genuine")]
            # isolated from its fellow guest, in the same VLAN
            assert heard(c2.tap_fds[0]) == []
            os.write(observer, frame("52:54:00:7b:00:77", b"from-uplink"))
            assert heard(c1.tap_fds[0]) == heard(c2.tap_fds[0]) == [(None, b"from-uplink")]
    finally:
        os.close(observer)
        ip("-n", vns, "link", "del", "obs0", check=False)


def test_refusals_say_what_to_do_and_leave_nothing(tapd: Daemon, vns: str) -> None:
    cases = [
        ({"br": "br0", "vlan": 30}, "vlan-not-permitted", "(10, 20)"),
        ({"br": "br3"}, "vlan-filtering-off", "ip link set br3 type bridge vlan_filtering 1"),
        ({"br": "br4", "vlan": 10}, "vlan-not-configured", "leave vlan out"),
    ]
    for options, code, advice in cases:
        with pytest.raises(client.ClientError) as refused:
            tapd.request(**options)
        assert refused.value.code == code and advice in str(refused.value)
    with pytest.raises(client.ClientError) as prepared:
        client.prepare_tap(path=tapd.socket_path, br="br0", vlan=30)
    assert prepared.value.code == "vlan-not-permitted"
    # The bridge helper's path (no vlan can be named): the rule's default.
    with granted(tapd, br="br4") as plain:
        assert "vlan" not in plain.reply and port_vlans(vns, plain.ifname) == {1: ACCESS}
    assert not any(link.startswith("tapdifb") for link in links(vns))


#: what the address filter and the rates need: the stage's modprobe loads
#: them with their dependencies (most the kernel would ask for on demand)
FENCE_MODULES = (
    "nf_tables", "nft_meta_bridge", "sch_tbf", "sch_ingress", "cls_u32", "act_mirred", "ifb",
)  # fmt: skip


def load_modules(*names: str) -> None:
    subprocess.run(["modprobe", "-a", *names], check=True, capture_output=True)


FILTERED = """
[[allow]]
users = ["0"]
bridges = ["br0"]
vlan = 10
mac_filtering = true
ip_ranges = ["10.77.9.0/24"]
ingress_limit = "8Mbit"
egress_limit = "2Mbit"
"""


def udp4(mac: str, source: str, marker: bytes) -> bytes:
    """A broadcast UDP datagram from ``mac`` and ``source`` (no checksums: no
    one on the path looks at them)."""
    payload = struct.pack("!HHHH", 40000, 40001, 8 + len(marker), 0) + marker
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
        socket.inet_aton(source), socket.inet_aton("10.77.9.255"),
    )  # fmt: skip
    return BROADCAST + bytes.fromhex(mac.replace(":", "")) + b"\x08\x00" + header + payload


def test_the_address_filter_and_the_rates_hold_on_an_access_port(tmp_path: Path) -> None:
    load_modules(*FENCE_MODULES)
    with netns("tapd-v-") as ns:
        ip("-n", ns, "link", "add", "br0", "type", "bridge", "vlan_filtering", "1")
        ip("-n", ns, "link", "set", "br0", "up")
        (observer,) = make_tap_in(ns, "obs0", vnet_hdr=False)
        try:
            ip("-n", ns, "link", "set", "obs0", "master", "br0", "up")
            bridge_cmd(ns, "vlan", "del", "dev", "obs0", "vid", "1")
            bridge_cmd(ns, "vlan", "add", "dev", "obs0", "vid", "10", "pvid", "untagged")
            with run_daemon(ns, tmp_path, FILTERED) as daemon:
                with granted(daemon, br="br0", guest_ips=["10.77.9.5"]) as guest:
                    assert guest.guest_mac is not None and guest.reply["vlan"] == 10
                    index = links(ns)[guest.ifname]["ifindex"]
                    # rates: a tbf on the tap, another on its ifb, what it sends redirected
                    assert redirect_target(ns, guest.ifname) == f"tapdifb{index:x}"
                    shown = subprocess.run(
                        ["tc", "-n", ns, "qdisc", "show", "dev", guest.ifname],
                        capture_output=True, text=True, check=True,
                    ).stdout  # fmt: skip
                    assert "tbf" in shown and "ingress" in shown
                    for source, marker in [("10.77.9.5", b"mine"), ("10.77.9.6", b"stolen"),
                                           ("10.77.9.5", b"later")]:  # fmt: skip
                        os.write(guest.tap_fds[0], udp4(guest.guest_mac, source, marker))
                    # What the guest sends queues on its ifb's tbf, in order, and
                    # comes back to the bridge from there: by "later", all has.
                    seen: list[bytes] = []
                    wait_until(lambda: b"later" in udp_markers(observer, seen),
                               what="the guest's last datagram")  # fmt: skip
                    assert seen == [b"mine", b"later"]
                wait_until(lambda: taps(ns) == ["obs0"], what="the guest's tap to go")
                wait_until(
                    lambda: not any(n.startswith("tapdifb") for n in links(ns)),
                    what="its ifb to go",
                )  # fmt: skip
        finally:
            os.close(observer)


def udp_markers(fd: int, into: list[bytes]) -> list[bytes]:
    """Add the markers of the UDP datagrams queued on ``fd`` to ``into``."""
    os.set_blocking(fd, False)
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return into
        if data[12:14] == b"\x08\x00" and data[23] == 17:
            into.append(data[42:])


def test_nothing_is_left_behind(tapd: Daemon, vns: str) -> None:
    wait_until(lambda: taps(vns) == [], what="every tap to go")
    wait_until(lambda: tapd.leases() == [], what="every lease to end")
    assert not any(name.startswith("tapdifb") for name in links(vns))
    assert tapd.proc.poll() is None


def test_a_restart_readopts_leases_and_repairs_a_changed_port(tmp_path: Path) -> None:
    with netns("tapd-v-") as ns:
        ip("-n", ns, "link", "add", "br0", "type", "bridge", "vlan_filtering", "1")
        ip("-n", ns, "link", "set", "br0", "up")
        (tmp_path / "1").mkdir()
        with run_daemon(ns, tmp_path / "1", CONFIG) as daemon:
            grant = daemon.request(br="br0", vlan=20, vnet_hdr=False)
            daemon.stop(signal.SIGKILL)
        try:
            # Behind tapd's back: the default VLAN back as PVID, another added.
            bridge_cmd(ns, "vlan", "add", "dev", grant.ifname, "vid", "1", "pvid", "untagged")
            bridge_cmd(ns, "vlan", "add", "dev", grant.ifname, "vid", "30")
            (tmp_path / "2").mkdir()
            with run_daemon(ns, tmp_path / "2", CONFIG) as daemon:
                wait_until(
                    lambda: any(e.get("event") == "lease.reconciled" for e in daemon.log()),
                    timeout=60, what="the restarted tapd to reconcile",
                )  # fmt: skip
                assert port_vlans(ns, grant.ifname) == {20: ACCESS}
                (repaired,) = [e for e in daemon.log() if e["event"] == "lease.vlans.repaired"]
                assert repaired["vlan"] == 20 and repaired["was"] == [1, 20, 30]
                (lease,) = daemon.leases()
                assert (lease["ifname"], lease["vlan"]) == (grant.ifname, 20)
                grant.close()
                wait_until(lambda: taps(ns) == [], what="the tap to go with its fds")
                wait_until(lambda: daemon.leases() == [], what="its lease to end")
        finally:
            grant.close()
