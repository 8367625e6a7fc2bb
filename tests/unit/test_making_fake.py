"""KernelMaker's one decision, without root: which thread does each kernel job,
and a half-made tap taken apart.  KernelTaps is faked; the worker runs inline
and records what it was handed."""

from __future__ import annotations

import os
import select
from typing import Any

import pytest
from fakes import InlineWorker

from tapd.errors import KernelError
from tapd.making import KernelMaker
from tapd.netlink import Bridge
from tapd.taps import AdoptSpec, MadeTap, TapSpec

BR0 = Bridge("br0", 2, 1500)


class Taps:
    """The KernelTaps calls KernelMaker makes; queue fds are pipe ends."""

    def __init__(self, cached: bool = True) -> None:
        self.cached = cached
        self.calls: list[str] = []
        self.fail_attach = False
        self.ends: list[int] = []

    def cached_bridge(self, name: str) -> Bridge | None:
        return BR0 if self.cached else None

    def bridge(self, name: str) -> Bridge:
        self.calls.append("bridge")
        return BR0

    def _made(self, queues: int) -> MadeTap:
        fds = []
        for _ in range(queues):
            end, fd = os.pipe()
            self.ends.append(end)
            fds.append(fd)
        return MadeTap("tap0", 7, "br0", fds, True, 12, "fe:00:00:00:00:01", 1500, 1)

    def create(self, spec: TapSpec, bridge: Bridge) -> MadeTap:
        self.calls.append("create")
        return self._made(spec.queues)

    def attach(self, made: MadeTap, bridge: Bridge, spec: TapSpec) -> None:
        self.calls.append("attach")
        if self.fail_attach:
            raise KernelError("the bridge is full")

    def prepare(self, spec: TapSpec, bridge: Bridge) -> MadeTap:
        self.calls.append("prepare")
        return self._made(0)

    def adopt(self, spec: AdoptSpec) -> MadeTap:
        self.calls.append("adopt")
        return self._made(0)

    def remove(self, index: int) -> bool:
        self.calls.append(f"remove {index}")
        return True

    def open_ends(self) -> int:
        """Queues some fd still holds (a write end open somewhere)."""
        poller = select.poll()
        for end in self.ends:
            poller.register(end, select.POLLHUP)
        return len(self.ends) - len(poller.poll(0))


def maker(taps: Taps) -> tuple[KernelMaker, InlineWorker]:
    worker = InlineWorker()
    made: Any = KernelMaker(taps, worker)  # type: ignore[arg-type]
    return made, worker


async def test_a_single_queue_tap_is_made_on_the_loop_while_the_worker_is_idle() -> None:
    taps = Taps()
    kernel, worker = maker(taps)
    made = await kernel.make(TapSpec(bridge="br0", ifname=None))
    assert taps.calls == ["create", "attach"] and worker.jobs == []
    made.close()


async def test_everything_else_goes_to_the_worker() -> None:
    taps = Taps(cached=False)
    kernel, worker = maker(taps)
    made = await kernel.make(TapSpec(bridge="br0", ifname=None, queues=4))
    assert worker.jobs == ["bridge", "_made"] and len(made.fds) == 4
    made.close()
    worker.jobs.clear()
    worker.busy = 1  # the worker is removing something: the loop would wait for RTNL
    (await kernel.make(TapSpec(bridge="br0", ifname=None))).close()
    assert worker.jobs == ["bridge", "_made"]
    worker.busy = 0
    worker.jobs.clear()
    await kernel.prepare(TapSpec(bridge="br0", ifname=None))
    await kernel.adopt(AdoptSpec(bridge="br0", fds=()))
    assert worker.jobs == ["bridge", "prepare", "adopt"]


@pytest.mark.parametrize("queues", [1, 2])
async def test_a_tap_that_fails_to_attach_is_taken_apart(queues: int) -> None:
    taps = Taps()
    taps.fail_attach = True
    kernel, _ = maker(taps)
    with pytest.raises(KernelError):
        await kernel.make(TapSpec(bridge="br0", ifname=None, queues=queues))
    assert taps.open_ends() == 0  # every queue closed: the kernel removes the tap


async def test_discard() -> None:
    taps = Taps()
    kernel, worker = maker(taps)
    made = await kernel.make(TapSpec(bridge="br0", ifname=None))
    await kernel.discard(made)
    assert taps.open_ends() == 0 and worker.jobs == ["close"]
    await kernel.discard(made, persistent=True)  # it outlives its fds: by index
    assert taps.calls[-1] == "remove 7"
