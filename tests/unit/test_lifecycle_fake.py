"""Lifecycle without root: leases against the fake kernel (tests/fakes.py).

Owners are real processes (their pidfds are what tapd watches); the taps,
their queues and the link events are the fake kernel's.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from fakes import FakeKernel, Programs, Stack, peer, process, stack

from tapd import lifecycle, owner
from tapd.config import Config
from tapd.errors import CoolingOff, GuestMacInUse, KernelError, TapLeased
from tapd.fence import Fence, ifb_name
from tapd.leases import LeaseTerms
from tapd.lifecycle import Grant
from tapd.netlink import LinkEvent
from tapd.protocol import decode_request


def config(programs: Programs, **rule: Any) -> Config:
    return Config.model_validate(
        {
            "programs": {
                "nft": programs.nft,
                "hooks": {"down": programs.hook("down"), "up": programs.hook("up")},
            },
            "allow": [{"users": [str(os.getuid())], "bridges": ["*"], **rule}],
        }
    )


@pytest.fixture
def programs(tmp_path: Path) -> Programs:
    return Programs(tmp_path)


async def until(condition: Callable[[], object], what: str = "condition") -> None:
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.005)


async def grant(s: Stack, pid: int, **options: Any) -> Grant:
    """A granted request from process ``pid``; tapd's own fds are closed
    (as once sent), the caller gets copies as the VM would."""
    who = peer(pid)
    try:
        line = json.dumps({"op": "request", "br": "br0", **options}).encode()
        return await s.service.handle(who, decode_request(line), [], s.log)
    finally:
        os.close(who.pidfd)


def delivered(g: Grant) -> list[int]:
    """What the VM holds once ``g`` is sent: its own copies of the fds."""
    held = [os.dup(fd) for fd in g.fds]
    g.sent()
    return held


def ended(s: Stack) -> list[dict[str, Any]]:
    return s.log.named("lease.ended")


async def test_owner_exit_leaves_a_held_tap_until_its_last_queue_closes(
    programs: Programs,
) -> None:
    async with stack(config(programs)) as s:
        with process() as vmm:
            g = await grant(s, vmm.pid)
            assert g.lease is not None
            index = g.lease.ifindex
            vm = delivered(g)
            vmm.kill()
            await until(lambda: s.log.named("lease.kept"))
        # The owner is gone, but a process holds the queue: the tap stays.
        assert s.log.named("lease.owner.exited")[0]["pid"] == vmm.pid
        assert s.log.named("lease.kept")[0]["reason"] == "in-use"
        assert index in s.kernel.links and s.lifecycle.registry.get(index) is g.lease
        # Its last queue closes: the kernel removes it, and the lease ends.
        os.close(vm[0])
        s.kernel.sweep()
        await until(lambda: s.lifecycle.registry.get(index) is None)
        assert index not in s.kernel.links
        assert ended(s)[0]["reason"] == "tap-removed"


async def test_an_orphan_made_persistent_goes_when_its_holder_closes_it(
    programs: Programs,
) -> None:
    async with stack(config(programs)) as s:
        with process() as vmm:
            g = await grant(s, vmm.pid)
            assert g.lease is not None
            index = g.lease.ifindex
            vm = delivered(g)
            s.kernel.links[index].persist = True  # TUNSETPERSIST through its fd
            vmm.kill()
            await until(lambda: s.log.named("lease.kept"))
        # Held: tapd cannot attach (EBUSY), so nothing changed.
        assert s.kernel.links[index].persist
        # The holder closes its queue: the carrier goes (IDLE), tapd clears
        # the persistence, and the tap goes.
        os.close(vm[0])
        s.kernel.sweep()
        assert (LinkEvent.IDLE, index) in s.kernel.emitted
        await until(lambda: s.lifecycle.registry.get(index) is None)
        # (a persistent tap that nobody holds stays, unless tapd clears it)
        assert index not in s.kernel.links


async def test_a_prepared_tap_goes_with_its_owner(programs: Programs) -> None:
    async with stack(config(programs)) as s:
        with process() as vmm:
            who = peer(vmm.pid)
            request = decode_request(b'{"op": "prepare", "br": "br0"}')
            g = await s.service.handle(who, request, [], s.log)
            os.close(who.pidfd)
            assert g.lease is not None and g.lease.prepared and g.fds == []
            index = g.lease.ifindex
            assert s.kernel.links[index].persist
            g.sent()
            vmm.kill()
            await until(lambda: s.lifecycle.registry.get(index) is None)
        assert index not in s.kernel.links  # persistent: gone only as tapd cleared it


async def test_an_adopted_tap_is_given_back_when_its_owner_goes(programs: Programs) -> None:
    async with stack(config(programs)) as s:
        mine = s.kernel.client_tap("vm0", owner=os.getuid())
        with process() as vmm:
            who = peer(vmm.pid)
            request = decode_request(b'{"op": "request", "br": "br0", "fd": "3"}')
            g = await s.service.handle(who, request, [mine], s.log)
            os.close(who.pidfd)
            assert g.lease is not None and g.lease.adopted
            link = s.kernel.by_name("vm0")
            assert link is not None and link.master is not None and link.alias
            g.sent()
            os.close(mine)  # the client closed its fd; nobody holds the tap
            # (a tap nobody holds and not persistent would go: keep it, as
            # the client's VMM would by holding it while its manager exits)
            link.persist = True
            vmm.kill()
            await until(lambda: s.lifecycle.registry.get(link.index) is None)
        # Given back as its maker handed it over: off the bridge, down, untagged.
        assert link.index in s.kernel.links
        assert (link.master, link.up, link.alias) == (None, False, "")
        assert ended(s)[0]["reason"] == "owner-exited"


async def test_a_removed_tap_ends_its_lease_with_downscript_ifb_and_filter(
    programs: Programs,
) -> None:
    cfg = config(programs, egress_limit="10Mbit", ip_ranges=["10.0.0.0/24"])
    async with stack(cfg) as s:
        g = await grant(s, os.getpid(), downscript="down", guest_ips=["10.0.0.5"])
        assert g.lease is not None
        index = g.lease.ifindex
        link = s.kernel.links[index]
        # Fenced before it came up: shaped through its ifb, filtered, up.
        assert link.qdiscs == (None, 10_000_000) and link.up
        assert s.kernel.by_name(ifb_name(index)) is not None
        assert [json.loads(d)["nftables"][0] for d in programs.nft_documents()]
        delivered(g)
        filters = len(programs.nft_documents())
        # Someone deletes the tap (ip link del): RTM_DELLINK.
        s.kernel.remove(index)
        await until(lambda: len(programs.ran()) == 1)
        await until(lambda: len(programs.nft_documents()) > filters)
        assert s.lifecycle.registry.get(index) is None
        assert ended(s)[0]["reason"] == "tap-removed"
        assert programs.ran() == [f"down {link.name}"]
        assert s.kernel.by_name(ifb_name(index)) is None
        removal = json.loads(programs.nft_documents()[-1])
        assert removal["nftables"][-1]["delete"]["chain"]["name"] == f"lease-{index}"


async def test_an_overrun_looks_again_and_ends_leases_whose_tap_went(
    programs: Programs,
) -> None:
    async with stack(config(programs)) as s:
        kept = await grant(s, os.getpid())
        gone = await grant(s, os.getpid())
        assert kept.lease is not None and gone.lease is not None
        delivered(kept)
        delivered(gone)
        s.kernel.remove(gone.lease.ifindex, announce=False)  # its event was lost
        await trio.testing.wait_all_tasks_blocked()
        assert s.lifecycle.registry.get(gone.lease.ifindex) is not None
        looks = len(s.log.named("lease.resync.complete"))  # (one at start)
        s.kernel.emit(LinkEvent.OVERRUN, 0)
        await until(lambda: len(s.log.named("lease.resync.complete")) > looks)
        assert s.log.named("link.events.overrun")
        assert s.log.named("lease.resync.complete")[-1]["ended"] == 1
        assert s.lifecycle.registry.indexes() == {kept.lease.ifindex}


def _tag(kernel: FakeKernel, name: str, pid: int, start: int, **terms: Any) -> int:
    lease = LeaseTerms(
        id=name, bridge="br0", queues=1, uid=os.getuid(), gid=os.getgid(),
        pid=pid, starttime=start, created=1, **terms,
    )  # fmt: skip
    bridge = kernel.by_name("br0")
    assert bridge is not None
    link = kernel.add(name, alias=lease.tag(), master=bridge.index, up=True, persist=True)
    return link.index


async def test_reconcile_restores_live_owners_and_settles_orphans(
    programs: Programs,
) -> None:
    kernel = FakeKernel()
    me, start = os.getpid(), owner.starttime(os.getpid())
    assert start is not None
    dead = subprocess.Popen(["true"])
    dead.wait()
    restored = _tag(kernel, "live", me, start, fence="L", guest_mac="02:00:00:00:00:01")
    orphan = _tag(kernel, "orphan", dead.pid, 1)
    held_orphan = _tag(kernel, "held", dead.pid, 1)
    vm = kernel.queue(kernel.links[held_orphan])
    kernel.add("stranger", alias="someone else's alias")
    stale_ifb = kernel.add(ifb_name(999), kind="ifb").index
    programs.listing.write_text(json.dumps({"nftables": [{"chain": {"name": "lease-999"}}]}))
    try:
        async with stack(config(programs), kernel) as s:
            assert s.lifecycle.reconciled == {"restored": 1, "orphaned": 2}
            # The live owner's lease is back and fenced again.
            assert s.lifecycle.registry.get(restored) is not None
            assert s.netlink.called("set_port") == [restored]
            assert s.log.named("lease.fence.restored")
            # The orphan nobody holds went; the one still held stays.
            assert orphan not in kernel.links
            assert s.lifecycle.registry.get(orphan) is None
            assert s.lifecycle.registry.get(held_orphan) is not None
            assert [x["reason"] for x in s.log.named("lease.kept")] == ["in-use"]
            # What tapd made for taps gone while it was away goes too.
            assert stale_ifb not in kernel.links
            assert "lease-999" in programs.nft_documents()[0]
            # The held orphan goes as its last queue closes.
            os.close(vm)
            kernel.sweep()
            await until(lambda: s.lifecycle.registry.get(held_orphan) is None)
            assert held_orphan not in kernel.links
    finally:
        kernel.close()


async def test_a_restart_sets_every_part_of_a_fence_it_can_and_leaves_a_down_tap_down(
    programs: Programs,
) -> None:
    """A trial: the nftables ruleset flushed and the guest MAC taken by
    another tap while tapd was away.  The static FDB entry cannot be set
    again (yet); the address filter must be, and a tap left down stays down."""
    kernel = FakeKernel()
    me, start = os.getpid(), owner.starttime(os.getpid())
    assert start is not None
    fence = Fence(mac_filtering=True, ip_filter=True).tag()
    index = _tag(
        kernel, "vm0", me, start, fence=fence, guest_mac="52:54:00:00:00:05",
        guest_ips=("10.0.0.5",),
    )  # fmt: skip
    kernel.links[index].up = False
    taken = GuestMacInUse("guest_mac 52:54:00:00:00:05 is already known to the bridge")
    try:
        async with stack(config(programs), kernel, fail={"set_port": taken}) as s:
            assert s.lifecycle.registry.get(index) is not None
            (failed,) = [e for e in s.log.events if e.event == "lease.fence.failed"]
            assert failed.level == "warning" and failed.fields["step"] == "port"
            assert "already known" in failed.fields["error"]
            assert any(f"lease-{index}" in d for d in programs.nft_documents())
            assert not s.log.named("lease.fence.restored")
            assert kernel.links[index].up is False
    finally:
        kernel.close()


async def test_a_tap_has_one_lease(programs: Programs) -> None:
    async with stack(config(programs)) as s:
        g = await grant(s, os.getpid())
        assert g.lease is not None
        delivered(g)
        pidfd = os.pidfd_open(os.getpid())
        with pytest.raises(TapLeased):
            s.lifecycle.begin(g.lease, pidfd)
        with pytest.raises(OSError):
            os.fstat(pidfd)  # taken, and closed on refusal


async def test_a_lease_that_cannot_start_leaves_no_fence_and_no_tap(
    programs: Programs,
) -> None:
    cfg = config(programs, egress_limit="1Mbit", ip_ranges=["10.0.0.0/24"])
    async with stack(cfg) as s:
        s.netlink.fail["bring_up"] = KernelError("the port will not come up")
        before = set(s.kernel.links)
        with pytest.raises(KernelError):
            await grant(s, os.getpid(), guest_ips=["10.0.0.7"])
        s.kernel.sweep()
        assert set(s.kernel.links) == before  # no tap, no ifb
        assert len(s.lifecycle.registry) == 0
        # The address filter loaded, then taken away again.
        assert len(programs.nft_documents()) == 2
        assert "delete" in programs.nft_documents()[1]


async def test_release_removes_a_held_tap_and_gives_back_an_adopted_one(
    programs: Programs,
) -> None:
    async with stack(config(programs)) as s:
        g = await grant(s, os.getpid())
        assert g.lease is not None
        vm = delivered(g)
        who = peer()
        release = decode_request(json.dumps({"op": "release", "lease": g.lease.id}).encode())
        await s.service.handle(who, release, [], s.log)
        await until(lambda: s.lifecycle.registry.get(g.lease.ifindex) is None)
        assert g.lease.ifindex not in s.kernel.links  # held by the VM, removed anyway
        os.close(vm[0])

        mine = s.kernel.client_tap("vm1", owner=os.getuid())
        adopt = decode_request(b'{"op": "request", "br": "br0", "fd": "3"}')
        g = await s.service.handle(who, adopt, [mine], s.log)
        assert g.lease is not None
        g.sent()
        release = decode_request(json.dumps({"op": "release", "lease": "vm1"}).encode())
        await s.service.handle(who, release, [], s.log)
        link = s.kernel.by_name("vm1")
        assert link is not None and (link.master, link.alias) == (None, "")
        assert s.lifecycle.registry.get(link.index) is None
        assert ended(s)[-1]["reason"] == "released"
        os.close(mine)
        os.close(who.pidfd)


async def readdressed(s: Stack, index: int, mac: str) -> None:
    """The tap's holder sets its address (SIOCSIFHWADDR): tapd hears of it
    and puts an address of its own back."""
    resets = len(s.log.named("lease.address.reset"))
    s.kernel.links[index].address = mac
    s.kernel.emit(LinkEvent.ADDRESS, index)
    await until(lambda: len(s.log.named("lease.address.reset")) > resets)


async def test_a_tap_readdressed_again_and_again_is_taken_from_its_holder(
    programs: Programs, autojump_clock: trio.testing.MockClock
) -> None:
    cfg = config(programs)
    # No subprocess (no nft) on the autojump clock, which would jump through its wait.
    cfg = cfg.model_copy(
        update={"programs": cfg.programs.model_copy(update={"nft": str(programs.root / "none")})}
    )
    async with stack(cfg) as s:
        g = await grant(s, os.getpid())
        assert g.lease is not None
        index = g.lease.ifindex
        held = delivered(g)
        # Resets spread over more than the window never add up to a revocation.
        for _ in range(lifecycle.READDRESS_STRIKES + 1):
            await readdressed(s, index, "52:54:00:12:34:56")
            assert s.kernel.links[index].address.startswith("fe:")
            await trio.sleep(lifecycle.READDRESS_WINDOW / (lifecycle.READDRESS_STRIKES - 1))
        assert s.lifecycle.registry.get(index) is not None and not s.log.named("lease.revoked")
        # As many within the window: the tap goes, with its lease.
        await trio.sleep(lifecycle.READDRESS_WINDOW)
        for _ in range(lifecycle.READDRESS_STRIKES):
            await readdressed(s, index, "52:54:00:12:34:56")
        await until(lambda: s.lifecycle.registry.get(index) is None)
        (revoked,) = s.log.named("lease.revoked")
        assert (revoked["ifname"], revoked["reason"]) == (g.lease.ifname, "readdressed")
        assert index not in s.kernel.links
        assert [(e["lease"], e["reason"]) for e in ended(s)] == [(g.lease.id, "revoked")]
        for fd in held:
            os.close(fd)
        # Its uid gets no new tap on that bridge for the cool-off, then does.
        with pytest.raises(CoolingOff) as refused:
            await grant(s, os.getpid())
        assert refused.value.code == "cooling-off" and "br0" in refused.value.message
        await trio.sleep(lifecycle.READDRESS_COOL_OFF)
        again = await grant(s, os.getpid())
        assert again.lease is not None
        for fd in delivered(again):
            os.close(fd)


async def test_an_adopted_tap_readdressed_again_and_again_is_given_back(
    programs: Programs,
) -> None:
    async with stack(config(programs)) as s:
        mine = s.kernel.client_tap("vm0", owner=os.getuid())
        who = peer(os.getpid())
        try:
            line = json.dumps({"op": "request", "br": "br0", "fd": "3"}).encode()
            g = await s.service.handle(who, decode_request(line), [mine], s.log)
        finally:
            os.close(who.pidfd)
        assert g.lease is not None
        g.sent()
        index = g.lease.ifindex
        for _ in range(lifecycle.READDRESS_STRIKES):
            await readdressed(s, index, "52:54:00:12:34:56")
        await until(lambda: s.lifecycle.registry.get(index) is None)
        link = s.kernel.links[index]  # the client's tap stays, off the bridge
        assert (link.master, link.alias, link.up) == (None, "", False)
        assert ended(s)[0]["reason"] == "revoked"
        os.close(mine)


class Gate:
    """The lifecycle's worker, but held after its first call of ``step`` (a
    netlink method's name), until the test lets it go."""

    def __init__(self, inner: Any, step: str = "set_address") -> None:
        self.inner = inner
        self.step = step
        self.reached = trio.Event()
        self.go = trio.Event()

    async def run(self, fn: Any, *args: Any) -> Any:
        result = await self.inner.run(fn, *args)
        if getattr(fn, "__name__", "") == self.step and not self.reached.is_set():
            self.reached.set()
            await self.go.wait()
        return result


async def adopt(s: Stack, fd: int, pid: int | None = None) -> Grant:
    who = peer(os.getpid() if pid is None else pid)
    try:
        line = json.dumps({"op": "request", "br": "br0", "fd": "3"}).encode()
        g = await s.service.handle(who, decode_request(line), [fd], s.log)
    finally:
        os.close(who.pidfd)
    g.sent()
    return g


async def test_a_lease_that_ends_while_its_address_is_put_back_leaves_no_strike(
    programs: Programs,
) -> None:
    async with stack(config(programs)) as s:
        gate = Gate(s.lifecycle.worker)
        s.lifecycle.worker = gate  # type: ignore[assignment]
        g = await grant(s, os.getpid())
        assert g.lease is not None
        index = g.lease.ifindex
        held = delivered(g)
        s.kernel.links[index].address = "52:54:00:12:34:56"
        s.kernel.emit(LinkEvent.ADDRESS, index)
        await gate.reached.wait()  # the address is tapd's again; not yet counted
        await s.lifecycle.release(g.lease)
        await until(lambda: s.lifecycle.registry.get(index) is None)
        gate.go.set()
        await trio.testing.wait_all_tasks_blocked()
        assert s.lifecycle._resets == {}
        assert not s.log.named("lease.address.reset")
        for fd in held:
            os.close(fd)


async def test_a_tap_adopted_again_has_its_own_address_change_put_back(
    programs: Programs,
) -> None:
    """A look at lease A's tap is running when A is given back and the same
    tap adopted as lease B, whose holder then changes the address: B's change
    is put back, not dropped with A."""
    async with stack(config(programs)) as s:
        gate = Gate(s.lifecycle.worker)
        s.lifecycle.worker = gate  # type: ignore[assignment]
        mine = s.kernel.client_tap("vm0", owner=os.getuid())
        a = await adopt(s, mine)
        assert a.lease is not None
        index = a.lease.ifindex
        link = s.kernel.links[index]
        link.address = "52:54:00:12:34:56"
        s.kernel.emit(LinkEvent.ADDRESS, index)
        await gate.reached.wait()
        await s.lifecycle.release(a.lease)
        b = await adopt(s, mine)
        assert b.lease is not None and s.lifecycle.registry.get(index) is b.lease
        link.address = "52:54:00:aa:bb:cc"  # B's holder
        s.kernel.emit(LinkEvent.ADDRESS, index)
        await trio.testing.wait_all_tasks_blocked()
        gate.go.set()
        await until(lambda: link.address.startswith("fe:"))
        (reset,) = s.log.named("lease.address.reset")
        assert (reset["lease"], reset["seen"]) == (b.lease.id, "52:54:00:aa:bb:cc")
        os.close(mine)


async def test_a_tap_adopted_again_while_its_old_orphan_settles_is_settled_too(
    programs: Programs,
) -> None:
    """Lease A's owner is gone and its settling is under way when A is given
    back and the tap adopted again as lease B, whose owner then goes too: B is
    settled (given back), not left behind with A's finished run."""
    async with stack(config(programs)) as s:
        gate = Gate(s.lifecycle.worker, "tun_info")
        s.lifecycle.worker = gate  # type: ignore[assignment]
        mine = s.kernel.client_tap("vm0", owner=os.getuid())
        with process() as vmm_a, process() as vmm_b:
            a = await adopt(s, mine, vmm_a.pid)
            assert a.lease is not None
            index = a.lease.ifindex
            vmm_a.kill()
            await gate.reached.wait()  # A's settling has looked at the tap
            await s.lifecycle.release(a.lease)
            b = await adopt(s, mine, vmm_b.pid)
            assert b.lease is not None and s.lifecycle.registry.get(index) is b.lease
            os.close(mine)  # nobody holds it now; persistent, as a VMM might leave it
            link = s.kernel.links[index]
            link.persist = True
            vmm_b.kill()
            await until(lambda: [e["lease"] for e in s.log.named("lease.owner.exited")][-1:]
                        == [b.lease.id])  # fmt: skip
            await trio.testing.wait_all_tasks_blocked()
            gate.go.set()
            await until(lambda: s.lifecycle.registry.get(index) is None)
        assert [(e["lease"], e["reason"]) for e in ended(s)] == [
            (a.lease.id, "released"),
            (b.lease.id, "owner-exited"),
        ]
        assert (link.master, link.alias) == (None, "")


async def test_an_old_settling_does_not_give_back_the_taps_new_lease(
    programs: Programs,
) -> None:
    """Lease A's settling found its tap unheld, and A was given back meanwhile
    and the tap adopted again as lease B: A's settling must not take B's tap
    off the bridge."""
    async with stack(config(programs)) as s:
        gate = Gate(s.lifecycle.worker, "tun_info")
        s.lifecycle.worker = gate  # type: ignore[assignment]
        mine = s.kernel.client_tap("vm0", owner=os.getuid())
        with process() as vmm_a:
            a = await adopt(s, mine, vmm_a.pid)
            assert a.lease is not None
            index = a.lease.ifindex
            link = s.kernel.links[index]
            link.persist = True
            os.close(mine)  # unheld when A's settling looks
            vmm_a.kill()
            await gate.reached.wait()
        await s.lifecycle.release(a.lease)
        again = s.kernel.queue(link)
        link.persist = False  # held again: as fresh as a client's tap (not root's) must be
        b = await adopt(s, again)
        assert b.lease is not None
        gate.go.set()
        await trio.testing.wait_all_tasks_blocked()
        assert s.lifecycle.registry.get(index) is b.lease
        assert link.master is not None and link.alias, "B's tap was given back with A"
        os.close(again)
