"""Guest MACs and fenced ports against the real kernel: what tapd sets is read
back from the bridge (``bridge -d -j link``, ``bridge -j fdb``), gone with the
lease, and set again by a tapd restarted after SIGKILL."""

from __future__ import annotations

import json
import signal
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
    redirect_target,
    run_daemon,
    taps,
    wait_until,
)

from tapd import client, tun
from tapd.fence import ifb_name

FENCED = """
[taps]
guest_mac_prefix = "52:54:00:7a"

[[allow]]
users = ["0"]
bridges = ["br0"]
mac_filtering = true
port_isolation = true
flood = false

[[allow]]
users = ["0"]
bridges = ["br1"]
"""


@pytest.fixture
def fenced(ns: str, br0: str, tmp_path: Path) -> Iterator[Daemon]:
    ip("-n", ns, "link", "add", "br1", "type", "bridge")
    with run_daemon(ns, tmp_path, FENCED) as daemon:
        yield daemon


def port(ns: str, name: str) -> dict[str, Any]:
    out = subprocess.run(
        ["bridge", "-n", ns, "-d", "-j", "link", "show", "dev", name],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (entry,) = json.loads(out)
    return dict(entry)


def static_macs(ns: str, name: str) -> list[str]:
    out = subprocess.run(
        ["bridge", "-n", ns, "-j", "fdb", "show", "dev", name],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sorted(
        e["mac"] for e in json.loads(out) if e.get("master") and e.get("state") == "static"
    )


def assert_fenced(ns: str, name: str, guest_mac: str) -> None:
    flags = port(ns, name)
    assert flags["locked"] is True and flags["isolated"] is True, flags
    assert flags["learning"] is False and flags["flood"] is False, flags
    assert static_macs(ns, name) == [guest_mac]


def test_a_fenced_grant_is_locked_to_its_guest_mac_and_isolated(fenced: Daemon) -> None:
    grant = fenced.request(br="br0")
    try:
        mac = grant.guest_mac
        assert mac is not None and mac.startswith("52:54:00:7a:")
        assert grant.reply["fence"] == {
            "mac_filtering": True, "port_isolation": True, "flood": False,
        }  # fmt: skip
        assert_fenced(fenced.ns, grant.ifname, mac)
        (lease,) = fenced.leases()
        assert lease["guest_mac"] == mac and lease["fence"] == grant.reply["fence"]
        (granted,) = [e for e in fenced.log() if e["event"] == "request.granted"]
        assert granted["guest_mac"] == mac and granted["fence"] == grant.reply["fence"]
        assert granted.get("guest_ips") is None  # none asked for
    finally:
        grant.close()
    wait_until(lambda: taps(fenced.ns) == [], what="the tap to go with its fds")
    wait_until(lambda: fenced.leases() == [], what="the lease to end")


def test_an_unfenced_rule_leaves_the_port_as_the_kernel_makes_it(fenced: Daemon) -> None:
    grant = fenced.request(br="br1")
    try:
        assert grant.guest_mac is not None and grant.reply.get("fence") is None
        flags = port(fenced.ns, grant.ifname)
        assert flags["locked"] is False and flags["isolated"] is False
        assert flags["learning"] is True and flags["flood"] is True
        assert static_macs(fenced.ns, grant.ifname) == []
    finally:
        grant.close()


def test_guest_macs_are_unique_among_live_leases(fenced: Daemon) -> None:
    grants = [fenced.request(br="br1") for _ in range(12)]
    try:
        macs = [g.guest_mac for g in grants]
        assert len(set(macs)) == 12
        with pytest.raises(client.ClientError) as exc:
            fenced.request(br="br0", guest_mac=str(macs[0]).upper())
        assert exc.value.code == "guest-mac-in-use"
        with pytest.raises(client.ClientError) as exc:
            fenced.request(br="br0", guest_mac="01:00:5e:00:00:01")
        assert exc.value.code == "invalid-value" and "multicast" in exc.value.message
        # one of the prefix's 65536 that the draws above did not take
        wanted = next(m for m in (f"52:54:00:7a:00:{i:02x}" for i in range(1, 14)) if m not in macs)
        grants.append(mine := fenced.request(br="br0", guest_mac=wanted))
        assert mine.guest_mac == wanted
        assert_fenced(fenced.ns, mine.ifname, wanted)
    finally:
        for g in grants:
            g.close()


def test_the_bridge_helper_cannot_promise_qemu_a_mac_so_a_filtering_rule_refuses_it(
    fenced: Daemon,
) -> None:
    with pytest.raises(client.ClientError) as exc:
        client.bridge_helper("br0", None, path=fenced.socket_path)
    assert exc.value.code == "denied"
    assert "mac_filtering" in exc.value.message and "{mac}" in exc.value.message
    assert taps(fenced.ns) == []


HOLDER = r"""
import sys, time
from tapd import client
grant = client.request_tap(path=sys.argv[1], br="br0")
print(grant.ifname, grant.guest_mac, flush=True)
time.sleep(600)
"""


def test_a_restarted_tapd_sets_a_lease_fence_again(ns: str, br0: str, tmp_path: Path) -> None:
    ip("-n", ns, "link", "add", "br1", "type", "bridge")
    with run_daemon(ns, tmp_path, FENCED) as first:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, first.socket_path], stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout is not None
            name, mac = holder.stdout.readline().split()
            assert_fenced(ns, name, mac)
            first.stop(signal.SIGKILL)
            # Whatever happened to the port while tapd was away...
            subprocess.run(
                ["bridge", "-n", ns, "link", "set", "dev", name, "isolated", "off", "locked",
                 "off", "learning", "on", "flood", "on"],
                check=True,
            )  # fmt: skip
            subprocess.run(
                ["bridge", "-n", ns, "fdb", "del", mac, "dev", name, "master"], check=True
            )
            assert port(ns, name)["locked"] is False and static_macs(ns, name) == []
            # ...the restarted tapd fences it again from the lease's tag.
            again = tmp_path / "again"
            again.mkdir()
            with run_daemon(ns, again, FENCED) as second:
                wait_until(lambda: len(second.leases()) == 1, what="the lease to be restored")
                assert_fenced(ns, name, mac)
                (lease,) = second.leases()
                assert lease["guest_mac"] == mac
                restored = [e for e in second.log() if e["event"] == "lease.fence.restored"]
                assert [e["lease"] for e in restored] == [lease["id"]]
        finally:
            holder.kill()
            holder.wait()
            assert holder.stdout is not None
            holder.stdout.close()


FENCED_AND_SHAPED = FENCED.replace("flood = false", 'flood = false\ningress_limit = "8Mbit"')


def test_an_adopted_tap_goes_back_unfenced(ns: str, br0: str, tmp_path: Path) -> None:
    ip("-n", ns, "link", "add", "br1", "type", "bridge")
    with run_daemon(ns, tmp_path, FENCED_AND_SHAPED) as daemon:
        fds = make_tap_in(ns, "own0")
        adopter = subprocess.Popen(
            [sys.executable, "-c", ADOPTER, daemon.socket_path, str(fds[0])],
            pass_fds=fds,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert adopter.stdout is not None
            mac = adopter.stdout.readline().strip()
            assert_fenced(ns, "own0", mac)
            assert tbf_rate(ns, "own0") == 8_000_000
            (lease,) = daemon.leases()
            daemon.call({"op": "release", "lease": lease["id"]})
            # the client's own tap, given back as the kernel makes taps
            wait_until(lambda: "master" not in links(ns)["own0"], what="own0 to leave br0")
            assert tbf_rate(ns, "own0") is None
            assert [q["kind"] for q in qdiscs(ns, "own0") if q["kind"] == "ingress"] == []
            link = links(ns)["own0"]
            assert not link.get("ifalias") and "UP" not in link["flags"], link
            assert static_macs(ns, "own0") == []
        finally:
            adopter.kill()
            adopter.wait()
            assert adopter.stdout is not None
            adopter.stdout.close()
            tun.close_all(fds)


ADOPTER = r"""
import sys, time
from tapd import client
grant = client.request_tap(path=sys.argv[1], br="br0", fd="t0", send_fds=[int(sys.argv[2])])
print(grant.guest_mac, flush=True)
time.sleep(600)
"""


SHAPED = """
[[allow]]
users = ["0"]
bridges = ["br0"]
ingress_limit = "8Mbit"
egress_limit = "2Mbit"
"""


def qdiscs(ns: str, dev: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["tc", "-n", ns, "-j", "qdisc", "show", "dev", dev], capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    return list(json.loads(out))


def tbf_rate(ns: str, dev: str) -> int | None:
    """The root tbf's rate in bits a second (tc -j reports bytes a second)."""
    for q in qdiscs(ns, dev):
        if q["kind"] == "tbf" and q.get("root"):
            return int(q["options"]["rate"]) * 8
    return None


def assert_shaped(ns: str, tap: str) -> str:
    index = links(ns)[tap]["ifindex"]
    ifb = ifb_name(index)
    assert tbf_rate(ns, tap) == 8_000_000  # what the guest receives
    assert ifb in links(ns), "no ifb for what the guest sends"
    assert tbf_rate(ns, ifb) == 2_000_000
    assert redirect_target(ns, tap) == ifb
    return ifb


def test_a_rate_limited_grant_is_shaped_both_ways_until_its_lease_ends(
    ns: str, br0: str, tmp_path: Path
) -> None:
    with run_daemon(ns, tmp_path, SHAPED) as daemon:
        grant = daemon.request(br="br0")
        try:
            ifb = assert_shaped(ns, grant.ifname)
            assert grant.reply["fence"]["ingress_limit"] == 8_000_000
            assert grant.reply["fence"]["egress_limit"] == 2_000_000
        finally:
            grant.close()
        wait_until(lambda: taps(ns) == [], what="the tap to go")
        wait_until(lambda: ifb not in links(ns), what="the lease's ifb to go with it")


def test_a_restarted_tapd_shapes_again_and_removes_ifbs_of_taps_gone_meanwhile(
    ns: str, br0: str, tmp_path: Path
) -> None:
    first_dir, second_dir = tmp_path / "1", tmp_path / "2"
    first_dir.mkdir()
    second_dir.mkdir()
    with run_daemon(ns, first_dir, SHAPED) as first:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, first.socket_path], stdout=subprocess.PIPE, text=True
        )
        gone = first.request(br="br0")
        try:
            assert holder.stdout is not None
            name = holder.stdout.readline().split()[0]
            ifb = assert_shaped(ns, name)
            gone_ifb = assert_shaped(ns, gone.ifname)
            first.stop(signal.SIGKILL)
            # while tapd is away: one tap's shaping is torn off, another tap goes
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", name, "root"], check=True)
            ip("-n", ns, "link", "del", ifb)
            gone.close()
            wait_until(lambda: gone.ifname not in links(ns), what="the other tap to go")
            assert gone_ifb in links(ns)  # nobody was there to remove it
            with run_daemon(ns, second_dir, SHAPED) as second:
                wait_until(lambda: len(second.leases()) == 1, what="the lease to be restored")
                wait_until(lambda: gone_ifb not in links(ns), what="the orphan ifb to go")
                assert_shaped(ns, name)
                events = [e["event"] for e in second.log()]
                assert "lease.fence.restored" in events and "lease.fence.failed" not in events
        finally:
            gone.close()
            holder.kill()
            holder.wait()
            assert holder.stdout is not None
            holder.stdout.close()


FILTERED = """
[[allow]]
users = ["0"]
bridges = ["br0"]
mac_filtering = true
ip_ranges = ["10.77.9.0/24", "fd00:77:9::/64"]
"""


def nft_chain(ns: str, ifindex: int) -> str | None:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "chain", "bridge", "tapd", f"lease-{ifindex}"],
        capture_output=True, text=True,
    )  # fmt: skip
    return done.stdout if done.returncode == 0 else None


def test_an_address_filtered_grant_passes_only_its_guest_ips(
    ns: str, br0: str, tmp_path: Path
) -> None:
    with run_daemon(ns, tmp_path, FILTERED) as daemon:
        with pytest.raises(client.ClientError) as exc:
            daemon.request(br="br0")
        assert exc.value.code == "guest-ips-required" and "10.77.9.0/24" in exc.value.message
        with pytest.raises(client.ClientError) as exc:
            daemon.request(br="br0", guest_ips=["10.77.10.5"])
        assert exc.value.code == "denied" and "outside" in exc.value.message
        grant = daemon.request(br="br0", guest_ips=["10.77.9.5", "fd00:77:9::5"])
        index = links(ns)[grant.ifname]["ifindex"]
        try:
            rules = nft_chain(ns, index)
            assert rules is not None
            assert f"arp saddr ether != {grant.guest_mac} drop" in rules
            assert "arp saddr ip != { 0.0.0.0, 10.77.9.5 } drop" in rules
            assert "ip saddr != 10.77.9.5 drop" in rules
            assert "fd00:77:9::5" in rules
            assert grant.reply["guest_ips"] == ["10.77.9.5", "fd00:77:9::5"]
            (granted,) = [e for e in daemon.log() if e["event"] == "request.granted"]
            assert granted["guest_ips"] == grant.reply["guest_ips"]
            assert granted["fence"] == grant.reply["fence"]
            with pytest.raises(client.ClientError) as exc:
                daemon.request(br="br0", guest_ips=["10.77.9.5"])
            assert exc.value.code == "guest-ip-in-use"
        finally:
            grant.close()
        wait_until(lambda: taps(ns) == [], what="the tap to go")
        wait_until(lambda: nft_chain(ns, index) is None, what="its filter to go")


def test_a_restarted_tapd_filters_again_and_drops_filters_of_taps_gone_meanwhile(
    ns: str, br0: str, tmp_path: Path
) -> None:
    first_dir, second_dir = tmp_path / "1", tmp_path / "2"
    first_dir.mkdir()
    second_dir.mkdir()
    holder_code = HOLDER.replace('br="br0")', 'br="br0", guest_ips=["10.77.9.7"])')
    with run_daemon(ns, first_dir, FILTERED) as first:
        holder = subprocess.Popen(
            [sys.executable, "-c", holder_code, first.socket_path], stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        gone = first.request(br="br0", guest_ips=["10.77.9.8"])
        try:
            assert holder.stdout is not None
            name = holder.stdout.readline().split()[0]
            index, gone_index = (links(ns)[n]["ifindex"] for n in (name, gone.ifname))
            assert nft_chain(ns, index) is not None and nft_chain(ns, gone_index) is not None
            first.stop(signal.SIGKILL)
            subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "delete", "element", "bridge", "tapd",
                 "taps", "{", str(index), "}"],
                check=True,
            )  # fmt: skip
            subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "delete", "chain", "bridge", "tapd",
                 f"lease-{index}"],
                check=True,
            )  # fmt: skip
            gone.close()
            wait_until(lambda: gone.ifname not in links(ns), what="the other tap to go")
            with run_daemon(ns, second_dir, FILTERED) as second:
                wait_until(lambda: len(second.leases()) == 1, what="the lease to be restored")
                wait_until(lambda: nft_chain(ns, gone_index) is None, what="the orphan to go")
                rules = nft_chain(ns, index)
                assert rules is not None and "ip saddr != 10.77.9.7 drop" in rules
                (lease,) = second.leases()
                assert lease["guest_ips"] == ["10.77.9.7"]
        finally:
            gone.close()
            holder.kill()
            holder.wait()
            assert holder.stdout is not None
            holder.stdout.close()
