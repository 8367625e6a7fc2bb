"""Lifecycle's look at the kernel after lost events, against a fake netlink."""

from __future__ import annotations

import os
import threading

import trio

from tapd.config import Config
from tapd.fence import Fence
from tapd.leases import Lease
from tapd.lifecycle import Lifecycle
from tapd.netlink import LinkEvent, Netlink
from tapd.worker import KernelWorker


class FakeNetlink:
    """Interfaces by index; ``present`` can be held mid-dump."""

    def __init__(self) -> None:
        self.links: set[int] = set()
        self.hold_dump = threading.Event()
        self.dumping = threading.Event()
        self.release_dump = threading.Event()

        #: addresses by index, the bridge's static entries, what tapd set
        self.addresses_now: dict[int, str] = {}
        self.statics: set[tuple[int, str]] = set()
        self.set_calls: list[tuple[str, int, str]] = []
        self.address_looks = 0

    def tagged_taps(self) -> list[tuple[int, str, str]]:
        return []

    def addresses(self) -> dict[int, str]:
        self.address_looks += 1
        return dict(self.addresses_now)

    def port_address(self, index: int) -> tuple[str, int | None] | None:
        return self.addresses_now[index], 99

    def set_address(self, index: int, mac: str) -> bool:
        self.addresses_now[index] = mac
        self.set_calls.append(("address", index, mac))
        return True

    def static_entries(self, bridge: int) -> set[tuple[int, str]]:
        assert bridge == 99
        return set(self.statics)

    def set_port(
        self, index: int, flags: dict[str, bool], mac: str | None, vlan: int | None = None
    ) -> None:
        assert mac is not None and not flags
        self.statics.add((index, mac))
        self.set_calls.append(("static", index, mac))

    def present(self) -> set[int]:
        snapshot = set(self.links)
        if self.hold_dump.is_set():
            self.dumping.set()
            self.release_dump.wait(10)
        return snapshot


def _lease(index: int, guest_mac: str | None = None, fence: str = "") -> Lease:
    return Lease(
        id=f"l{index}", ifname=f"tap{index}", ifindex=index, bridge="br0", queues=1,
        uid=0, gid=0, pid=os.getpid(), starttime=0, created=index,
        guest_mac=guest_mac, fence=fence,
    )  # fmt: skip


async def test_a_resync_ends_only_leases_it_knew_before_its_dump() -> None:
    netlink = FakeNetlink()
    worker = KernelWorker()
    lifecycle = Lifecycle(Config(), worker, Netlink())
    lifecycle.netlink = netlink  # type: ignore[assignment]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lifecycle.run)
            netlink.links |= {1, 2}
            lifecycle.begin(_lease(1), os.pidfd_open(os.getpid()))
            lifecycle.begin(_lease(2), os.pidfd_open(os.getpid()))
            # Events were lost; the look begins and takes its snapshot...
            netlink.hold_dump.set()
            netlink.links.discard(2)  # (tap 2 went meanwhile, unannounced)
            lifecycle._link_event(LinkEvent.OVERRUN, 0)
            await trio.to_thread.run_sync(netlink.dumping.wait, 10)
            # ...and a tap is made and leased while it runs.
            netlink.links.add(3)
            lifecycle.begin(_lease(3), os.pidfd_open(os.getpid()))
            netlink.release_dump.set()
            while lifecycle.registry.get(2) is not None:
                await trio.sleep(0.01)
            # Tap 3 is not in that dump, but its lease is younger than it.
            assert sorted(lifecycle.registry.indexes()) == [1, 3]
            nursery.cancel_scope.cancel()
    finally:
        worker.close()


async def test_a_tap_address_changed_while_events_were_lost_is_put_back() -> None:
    netlink = FakeNetlink()
    worker = KernelWorker()
    lifecycle = Lifecycle(Config(), worker, Netlink())
    lifecycle.netlink = netlink  # type: ignore[assignment]
    victim_mac = "52:54:00:00:00:07"
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lifecycle.run)
            with trio.fail_after(5):
                while not netlink.address_looks:  # the look at start, with no lease yet
                    await trio.sleep(0.01)
            netlink.links |= {1, 2}
            netlink.addresses_now.update({1: "fe:7a:00:00:00:01", 2: "fe:7a:00:00:00:02"})
            victim = _lease(1, guest_mac=victim_mac, fence=Fence(mac_filtering=True).tag())
            lifecycle.begin(victim, os.pidfd_open(os.getpid()))
            lifecycle.begin(_lease(2), os.pidfd_open(os.getpid()))
            # tap 2's holder took the victim's address (the kernel dropped the
            # victim's static entry), and the event was lost
            netlink.addresses_now[2] = victim_mac
            lifecycle._link_event(LinkEvent.OVERRUN, 0)
            with trio.fail_after(5):
                while (1, victim_mac) not in netlink.statics:
                    await trio.sleep(0.01)
            assert [call[:2] for call in netlink.set_calls] == [("address", 2), ("static", 1)]
            assert netlink.addresses_now[2].startswith("fe:7a:")
            assert netlink.addresses_now[1] == "fe:7a:00:00:00:01"
            nursery.cancel_scope.cancel()
    finally:
        worker.close()
