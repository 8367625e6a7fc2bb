"""Making taps from the trio loop: which thread does each kernel job.

Code above this module asks for a tap with one awaitable call
(:class:`TapMaker`) and never learns where the work ran.  Where it runs is a
speed decision, and it is made here only:

* A single-queue tap is a few syscalls (~0.5 ms, nearly all of it the
  kernel's), and the hop to the kernel worker and back costs 0.4 ms more (two
  thread wake-ups and the GIL changing hands each way), so the loop makes it
  itself - unless the worker is busy (its removals hold RTNL for
  milliseconds, and the loop would wait for them).
* Everything else runs on the worker (:class:`tapd.worker.KernelWorker`): a
  multi-queue tap (a 256-queue one is ~1,000 RTNL round trips), a bridge
  lookup (pyroute2), a persistent tap, an adoption, and the removal of a tap
  that will not be granted (the last close of a queue waits for an RCU grace
  period).

A tap that fails half-way is taken apart here too, on the worker, whichever
thread made it.  :class:`KernelMaker` is the real thing; tests above the
kernel use a fake with the same protocol.
"""

from __future__ import annotations

from typing import Protocol

import trio

from .netlink import Bridge
from .taps import AdoptSpec, KernelTaps, MadeTap, TapSpec
from .worker import KernelWorker


class TapMaker(Protocol):
    """Taps made ready for a VM, awaitable.  Each call either returns a tap
    on its bridge, the caller's to hand out or :meth:`discard`, or raises
    having left nothing behind."""

    async def make(self, spec: TapSpec) -> MadeTap:
        """A new tap with ``spec.queues`` queue fds, on its bridge."""
        ...

    async def prepare(self, spec: TapSpec) -> MadeTap:
        """A new persistent tap on its bridge, no queue open (the VMM opens it
        by name)."""
        ...

    async def adopt(self, spec: AdoptSpec) -> MadeTap:
        """Queue fds made elsewhere, checked and put on the bridge; they stay
        the caller's."""
        ...

    async def discard(self, made: MadeTap, persistent: bool = False) -> None:
        """Take apart a tap that will not be granted (not an adopted one)."""
        ...


class KernelMaker:
    """:class:`TapMaker` on the real kernel: :class:`tapd.taps.KernelTaps`
    called on the loop or on the kernel worker, as the module says."""

    def __init__(self, taps: KernelTaps, worker: KernelWorker) -> None:
        self.taps = taps
        self.worker = worker

    async def make(self, spec: TapSpec) -> MadeTap:
        bridge = await self._bridge(spec.bridge)
        if spec.queues > 1 or self.worker.busy:
            return await self.worker.run(self._made, spec, bridge)
        made = self.taps.create(spec, bridge)
        try:
            self.taps.attach(made, bridge, spec)
        except BaseException:
            await self.discard(made)
            raise
        return made

    def _made(self, spec: TapSpec, bridge: Bridge) -> MadeTap:
        """(Kernel thread.)  The tap, on its bridge; removed on failure."""
        made = self.taps.create(spec, bridge)
        try:
            self.taps.attach(made, bridge, spec)
        except BaseException:
            # Closing the last fd of a non-persistent tap removes the device.
            made.close()
            raise
        return made

    async def prepare(self, spec: TapSpec) -> MadeTap:
        return await self.worker.run(self.taps.prepare, spec, await self._bridge(spec.bridge))

    async def adopt(self, spec: AdoptSpec) -> MadeTap:
        return await self.worker.run(self.taps.adopt, spec)

    async def discard(self, made: MadeTap, persistent: bool = False) -> None:
        with trio.CancelScope(shield=True):
            if persistent:
                # It outlives its fds: removed by index.
                await self.worker.run(self.taps.remove, made.ifindex)
            else:
                await self.worker.run(made.close)

    async def _bridge(self, name: str) -> Bridge:
        bridge = self.taps.cached_bridge(name)
        if bridge is None:
            bridge = await self.worker.run(self.taps.bridge, name)
        return bridge
