"""Lifecycle's look at the kernel after lost events, against a fake netlink."""

from __future__ import annotations

import os
import threading

import trio

from tapd.config import Config
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

    def tagged_taps(self) -> list[tuple[int, str, str]]:
        return []

    def present(self) -> set[int]:
        snapshot = set(self.links)
        if self.hold_dump.is_set():
            self.dumping.set()
            self.release_dump.wait(10)
        return snapshot


def _lease(index: int) -> Lease:
    return Lease(
        id=f"l{index}", ifname=f"tap{index}", ifindex=index, bridge="br0", queues=1,
        uid=0, gid=0, pid=os.getpid(), starttime=0, created=index,
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
