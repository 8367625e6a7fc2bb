"""VLAN per tap by policy, without root: the rule's choice, its validation,
the lease tag, and the grant/restart paths on the fake kernel layer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeKernel, Programs, Stack, peer, process, stack

from tapd import owner
from tapd.config import Config, ConfigError, parse
from tapd.errors import VlanFilteringOff, VlanNotConfigured, VlanNotPermitted
from tapd.fence import Fence, choose_vlan
from tapd.leases import LeaseTerms, parse_tag
from tapd.lifecycle import Grant
from tapd.models import ListReply, PrepareReply, TapReply
from tapd.ports import ACCESS
from tapd.protocol import decode_request
from tapd.tapctl import _vlan_cell

RULE = '[[allow]]\nusers = ["0"]\nbridges = ["br0"]\n'

# -- pure logic -------------------------------------------------------------------


def test_a_rules_first_vlan_is_its_default_and_a_request_picks_another() -> None:
    assert choose_vlan(None, (10, 20), "allow[0]") == 10
    assert choose_vlan(20, (10, 20), "allow[0]") == 20
    assert choose_vlan(None, (), "allow[0]") is None


def test_a_vlan_the_rule_does_not_permit_is_refused_with_what_it_does() -> None:
    with pytest.raises(VlanNotPermitted, match=r"30 is not a VLAN allow\[1\] permits \(10, 20\)"):
        choose_vlan(30, (10, 20), "allow[1]")
    assert VlanNotPermitted.code == "vlan-not-permitted"


def test_a_vlan_under_a_rule_without_vlans_is_refused() -> None:
    with pytest.raises(VlanNotConfigured, match=r"puts its taps in no VLAN.*leave vlan out"):
        choose_vlan(10, (), "allow[0]")
    assert VlanNotConfigured.code == "vlan-not-configured"


def test_config_takes_one_vlan_or_a_list() -> None:
    (one,) = parse(RULE + "vlan = 10\n").allow
    (many,) = parse(RULE + "vlan = [10, 20]\nvlan_tagged = [30, 40]\n").allow
    assert (one.vlan, one.vlan_tagged) == ((10,), ())
    assert (many.vlan, many.vlan_tagged) == ((10, 20), (30, 40))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("vlan = 0", "0 is no VLAN id: 1 to 4094"),
        ("vlan = [10, 4095]", "4095 is no VLAN id: 1 to 4094"),
        ("vlan_tagged = [-1]", "-1 is no VLAN id"),
        ('vlan = "10"', "must be a VLAN id or an array of them"),
        ("vlan = true", "must be a VLAN id or an array of them"),
        ("vlan = [10, 10]", "vlan names 10 more than once"),
        ("vlan = 10\nvlan_tagged = [10]", "VLAN 10 is in both vlan and vlan_tagged"),
    ],
)
def test_config_refuses_bad_vlans(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse(RULE + text + "\n")


@pytest.mark.parametrize("fence", ["mac_filtering = true", 'ip_ranges = ["10.0.0.0/24"]'])
def test_a_trunk_with_an_identity_fence_is_refused_at_load(fence: str, tmp_path: Path) -> None:
    nft = tmp_path / "nft"
    nft.write_text("#!/bin/sh\n")
    nft.chmod(0o755)
    text = f'[programs]\nnft = "{nft}"\n' + RULE + f"vlan_tagged = [20]\n{fence}\n"
    with pytest.raises(ConfigError, match=r"vlan_tagged \(a trunk\) cannot be fenced"):
        parse(text)
    # The access port of the same rule is fenced, and a trunk may be isolated.
    parse(text.replace("vlan_tagged = [20]", "vlan = 10"))
    parse(RULE + "vlan_tagged = [20]\nport_isolation = true\negress_limit = '1Mbit'\n")


def test_the_lease_tag_carries_the_vlans_and_a_restart_reads_them() -> None:
    fence = Fence(mac_filtering=True, vlan=10, vlan_tagged=(20, 4094))
    assert fence.tag() == "M-V10-T20.4094" and fence.wanted
    assert Fence.from_tag(fence.tag()) == fence
    terms = LeaseTerms(
        id="x", bridge="br0", queues=1, uid=0, gid=0, pid=1, starttime=1, created=1,
        fence=fence.tag(),
    )  # fmt: skip
    lease = parse_tag(7, "tap0", terms.tag())
    assert lease is not None
    wire = lease.to_wire()
    assert (wire["vlan"], wire["vlan_tagged"]) == (10, (20, 4094))
    assert Fence(vlan=10).wanted and not Fence().vlans


def test_a_trunk_of_every_vlan_fits_the_tag_and_scattered_ones_are_refused_at_load() -> None:
    every = Fence(vlan_tagged=tuple(range(1, 4095)))
    assert every.tag() == "T1~4094" and Fence.from_tag(every.tag()) == every
    runs = Fence(vlan=5, vlan_tagged=(10, 11, 12, 20, 30, 31))
    assert runs.tag() == "V5-T10~12.20.30~31" and Fence.from_tag(runs.tag()) == runs
    (rule,) = parse(RULE + "vlan_tagged = [" + ", ".join(map(str, range(1, 4095))) + "]\n").allow
    assert len(rule.vlan_tagged) == 4094
    with pytest.raises(ConfigError, match="too many separate VLANs"):
        parse(RULE + "vlan_tagged = [" + ", ".join(map(str, range(1, 400, 2))) + "]\n")
    assert Fence.from_tag("T20~10.5~x.7").vlan_tagged == (7,)


@pytest.mark.parametrize("part", ["V0", "V4095", "Vx", "V", "V\u0967\u0966"])
def test_a_tag_with_no_vlan_id_sets_none(part: str) -> None:
    assert Fence.from_tag(f"I-{part}") == Fence(isolated=True)
    assert Fence.from_tag(f"T{part[1:]}.20").vlan_tagged == (20,)


def test_list_shows_a_leases_vlans() -> None:
    assert _vlan_cell({"vlan": 10, "vlan_tagged": None}) == "10"
    assert _vlan_cell({"vlan": 10, "vlan_tagged": [20, 30]}) == "10+t20,30"
    assert _vlan_cell({"vlan": None, "vlan_tagged": [20]}) == "t20"
    assert _vlan_cell({}) == "-"


# -- on the fake kernel -------------------------------------------------------------


def config(programs: Programs, **rule: Any) -> Config:
    return Config.model_validate(
        {
            "programs": {"nft": programs.nft},
            "allow": [{"users": [str(os.getuid())], "bridges": ["*"], **rule}],
        }
    )


@pytest.fixture
def programs(tmp_path: Path) -> Programs:
    return Programs(tmp_path)


def filtering(kernel: FakeKernel, on: bool = True) -> FakeKernel:
    bridge = kernel.by_name("br0")
    assert bridge is not None
    bridge.vlan_filtering = on
    return kernel


async def ask(s: Stack, fds: list[int] | None = None, **request: Any) -> Grant:
    request.setdefault("op", "request")
    if request["op"] in ("request", "prepare"):
        request.setdefault("br", "br0")
    who = peer()
    try:
        line = json.dumps(request).encode()
        return await s.service.handle(who, decode_request(line), fds or [], s.log)
    finally:
        os.close(who.pidfd)


async def test_a_granted_tap_is_in_its_vlan_alone_before_it_comes_up(programs: Programs) -> None:
    async with stack(config(programs, vlan=[10, 20]), filtering(FakeKernel())) as s:
        g = await ask(s)
        assert isinstance(g.reply, TapReply) and g.lease is not None
        assert (g.reply.vlan, g.reply.vlan_tagged) == (10, None)
        assert g.reply.fence is None  # VLANs alone fence nothing
        link = s.kernel.links[g.lease.ifindex]
        # The bridge's default VLAN 1 is gone; the port was down as it was set.
        assert link.vlans == {10: ACCESS} and link.vlans_set_up == [False]
        assert link.up
        assert s.netlink.calls.index(("set_vlans", link.index)) < s.netlink.calls.index(
            ("bring_up", link.index)
        )
        g2 = await ask(s, vlan=20)
        assert g2.lease is not None and s.kernel.links[g2.lease.ifindex].vlans == {20: ACCESS}
        listed = (await ask(s, op="list")).reply
        assert isinstance(listed, ListReply)
        assert sorted(x.vlan or 0 for x in listed.leases) == [10, 20]
        g.sent()
        g2.sent()
        (granted, _) = s.log.named("request.granted")
        assert granted["vlan"] == 10


async def test_a_trunk_carries_its_tagged_vlans_beside_its_access_one(programs: Programs) -> None:
    rule = {"vlan": 10, "vlan_tagged": [20, 30], "port_isolation": True}
    async with stack(config(programs, **rule), filtering(FakeKernel())) as s:
        g = await ask(s)
        assert isinstance(g.reply, TapReply) and g.lease is not None
        assert (g.reply.vlan, g.reply.vlan_tagged) == (10, (20, 30))
        link = s.kernel.links[g.lease.ifindex]
        assert link.vlans == {10: ACCESS, 20: 0, 30: 0}
        assert link.port_flags == {"isolated": True}
        g.sent()


async def test_mac_filtering_puts_the_static_entry_in_the_access_vlan(
    programs: Programs,
) -> None:
    async with stack(config(programs, vlan=10, mac_filtering=True), filtering(FakeKernel())) as s:
        g = await ask(s, vlan=10)
        assert g.lease is not None
        link = s.kernel.links[g.lease.ifindex]
        assert (link.static_mac, link.static_vlan) == (g.lease.guest_mac, 10)
        assert isinstance(g.reply, TapReply) and g.reply.fence is not None
        assert g.reply.fence["mac_filtering"] is True and g.reply.vlan == 10
        # The step order: VLANs first, then flags and the entry, then up.
        steps = [c for c, i in s.netlink.calls if i == link.index]
        assert steps[-3:] == ["set_vlans", "set_port", "bring_up"]
        g.sent()


async def test_refusals_make_no_tap(programs: Programs) -> None:
    async with stack(config(programs, vlan=[10, 20]), FakeKernel()) as s:
        with pytest.raises(VlanFilteringOff, match="ip link set br0 type bridge vlan_filtering 1"):
            await ask(s)
        filtering(s.kernel)
        with pytest.raises(VlanNotPermitted):
            await ask(s, vlan=30)
        assert not s.kernel.taps() and not s.maker.calls
    async with stack(config(programs), filtering(FakeKernel())) as s:
        with pytest.raises(VlanNotConfigured):
            await ask(s, vlan=10)
        # A rule without VLANs leaves the port as the bridge has it.
        g = await ask(s)
        assert g.lease is not None and s.kernel.links[g.lease.ifindex].vlans == {1: ACCESS}
        assert not s.netlink.called("set_vlans") and not s.netlink.called("vlan_filtering")
        g.sent()


async def test_prepare_adoption_and_the_bridge_helper_get_vlans_too(programs: Programs) -> None:
    async with stack(config(programs, vlan=[10, 20]), filtering(FakeKernel())) as s:
        g = await ask(s, op="prepare", vlan=20)
        assert isinstance(g.reply, PrepareReply) and g.reply.vlan == 20 and g.lease is not None
        assert s.kernel.links[g.lease.ifindex].vlans == {20: ACCESS}
        g.sent()
        mine = s.kernel.client_tap("vm0", owner=os.getuid())
        g = await ask(s, [mine], fd="3", vlan=20)
        link = s.kernel.by_name("vm0")
        assert link is not None and link.vlans == {20: ACCESS} and link.up
        g.sent()
        with pytest.raises(VlanNotPermitted):
            await ask(s, [mine], fd="3", vlan=30)
        os.close(mine)
        with process() as helper:  # our child: we are its VMM
            who = peer(helper.pid)
            line = json.dumps({"op": "bridge-helper", "br": "br0"}).encode()
            g = await s.service.handle(who, decode_request(line), [], s.log)
            os.close(who.pidfd)
            # The helper protocol cannot name a VLAN: the rule's default.
            assert g.lease is not None and s.kernel.links[g.lease.ifindex].vlans == {10: ACCESS}
            g.sent()


async def test_a_restart_repairs_a_port_whose_vlans_were_changed(programs: Programs) -> None:
    kernel = filtering(FakeKernel())
    me, start = os.getpid(), owner.starttime(os.getpid())
    assert start is not None
    lease = LeaseTerms(
        id="l1", bridge="br0", queues=1, uid=os.getuid(), gid=os.getgid(), pid=me,
        starttime=start, created=1, fence=Fence(vlan=10, vlan_tagged=(30,)).tag(),
    )  # fmt: skip
    bridge = kernel.by_name("br0")
    assert bridge is not None
    changed = kernel.add("vm0", alias=lease.tag(), master=bridge.index, up=True, persist=True)
    changed.vlans = {1: ACCESS, 10: 0}  # someone's `bridge vlan add`s
    kept = kernel.add(
        "vm1", alias=lease.tag().replace("id=l1", "id=l2"), master=bridge.index, up=True,
        persist=True, vlans={10: ACCESS, 30: 0},
    )  # fmt: skip
    try:
        async with stack(config(programs, vlan=10), kernel) as s:
            assert s.lifecycle.reconciled["restored"] == 2
            assert changed.vlans == kept.vlans == {10: ACCESS, 30: 0}
            (repaired,) = s.log.named("lease.vlans.repaired")
            assert (repaired["ifname"], repaired["vlan"], repaired["was"]) == (
                "vm0",
                10,
                [1, 10, 30],
            )
            listed = (await ask(s, op="list")).reply
            assert isinstance(listed, ListReply)
            assert {(x.vlan, x.vlan_tagged) for x in listed.leases} == {(10, (30,))}
    finally:
        kernel.close()
