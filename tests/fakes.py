"""A fake of the kernel layer, for tests of everything above it without root.

What tapd asks of the kernel goes through three small interfaces: the
:class:`tapd.making.TapMaker` (make, prepare, adopt, discard a tap), the part
of :class:`tapd.netlink.Netlink` that :class:`tapd.lifecycle.Lifecycle` uses,
and the kernel worker.  Here each has an in-memory stand-in over one
:class:`FakeKernel`, so that ``Service``, ``Server`` and ``Lifecycle`` run as
they do in tapd, as any user, and a test can look at what they left behind.

The fds are real and cheap: a tap queue is the write end of a pipe whose read
end the fake kernel keeps, so a queue is held exactly while some process has
a copy of that write end open (the read end polls POLLHUP once none has).
Passing fds over a socket, closing them, and leaking them are therefore real,
and the kernel's rule - a tap that is not persistent goes with its last queue -
is applied by :meth:`FakeKernel.sweep`, which every query runs first.

Link events are delivered as the kernel's are: asynchronously, to whoever
listens (:meth:`FakeKernel.events`, what ``Lifecycle`` takes in place of
:func:`tapd.netlink.link_events`), and lost if nobody does.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import select
import socket
import stat
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import outcome
import trio

from tapd import tun
from tapd.config import Config
from tapd.errors import BridgeNotFound, Denied, IfnameTaken, KernelError, NotATap, TapLeased
from tapd.fence import ifb_name, ifb_tap
from tapd.lifecycle import Lifecycle
from tapd.netlink import Bridge, LinkEvent, TapLink, TunInfo, TunLink
from tapd.owner import Peer
from tapd.ports import ACCESS, wanted_vlans
from tapd.service import Service
from tapd.taps import AdoptSpec, MadeTap, TapSpec, adoption_problem, random_mac

T = TypeVar("T")

#: what tun_link() reports as a tap's TUNSETIFF flags
TAP_FLAGS = tun.IFF_TAP | tun.IFF_NO_PI | tun.IFF_VNET_HDR


@dataclass(eq=False)
class Link:
    """One interface of the fake kernel."""

    index: int
    name: str
    kind: str = "tun"  # "tun", "bridge" or "ifb"
    alias: str = ""
    master: int | None = None
    up: bool = False
    persist: bool = False
    multi_queue: bool = False
    owner: int | None = None
    group: int | None = None
    mtu: int = 1500
    #: the device's own MAC (a tap's is tapd's fe: address unless a VMM changes it)
    address: str = field(default_factory=random_mac)
    #: the kernel's end of each queue fd handed out (a pipe's read end)
    ends: list[int] = field(default_factory=list)
    #: bridge port flags and the static FDB entry (set_port), None: none set
    port_flags: dict[str, bool] | None = None
    static_mac: str | None = None
    #: the tap's own qdiscs as (ingress, egress) rates; None: none
    qdiscs: tuple[int | None, int | None] | None = None
    was_held: bool = False
    #: a bridge's vlan_filtering; a port's VLANs (vid -> PVID/untagged flags:
    #: a port joins in the bridge's default VLAN 1, as the kernel's do), the
    #: VLAN of its static FDB entry, and whether it was up each time tapd set
    #: its VLANs
    vlan_filtering: bool = False
    vlans: dict[int, int] = field(default_factory=dict)
    static_vlan: int | None = None
    vlans_set_up: list[bool] = field(default_factory=list)


def _hung_up(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    return any(ev & select.POLLHUP for _, ev in poller.poll(0))


class FakeKernel:
    """Interfaces by index, with tap queues that are real fds."""

    def __init__(self) -> None:
        self.links: dict[int, Link] = {}
        self._indexes = itertools.count(100)
        #: pipe inode -> interface index: which tap a queue fd belongs to
        self._inodes: dict[int, int] = {}
        self._send: trio.MemorySendChannel[tuple[LinkEvent, int]] | None = None
        #: every event emitted, listened to or not
        self.emitted: list[tuple[LinkEvent, int]] = []
        self.add("br0", kind="bridge", up=True, mtu=1400)

    # -- the state ------------------------------------------------------------

    def add(self, name: str, **attrs: Any) -> Link:
        if self.by_name(name) is not None:
            raise IfnameTaken(f"interface {name!r} exists already")
        link = Link(index=next(self._indexes), name=name, **attrs)
        self.links[link.index] = link
        return link

    def by_name(self, name: str) -> Link | None:
        return next((x for x in self.links.values() if x.name == name), None)

    def by_fd(self, fd: int) -> Link | None:
        """The tap whose queue ``fd`` is (any copy of it)."""
        try:
            st = os.fstat(fd)
        except OSError:
            return None
        if not stat.S_ISFIFO(st.st_mode):
            return None
        index = self._inodes.get(st.st_ino)
        return None if index is None else self.links.get(index)

    def queue(self, link: Link) -> int:
        """A new queue fd of ``link``: the caller's to hand out or close."""
        end, fd = os.pipe()
        link.ends.append(end)
        link.was_held = True
        self._inodes[os.fstat(end).st_ino] = link.index
        return fd

    def client_tap(self, name: str, owner: int | None) -> int:
        """A tap a client made itself (TUNSETIFF, then TUNSETOWNER ``owner``):
        down, nobody's port, not persistent; its one queue fd is returned."""
        return self.queue(self.add(name, owner=owner))

    def held(self, link: Link) -> int:
        """How many of ``link``'s queues some process still holds."""
        for end in list(link.ends):
            if _hung_up(end):
                link.ends.remove(end)
                os.close(end)
        return len(link.ends)

    def remove(self, index: int, announce: bool = True) -> bool:
        link = self.links.pop(index, None)
        if link is None:
            return False
        tun.close_all(link.ends)
        link.ends = []
        for port in self.links.values():
            if port.master == index:
                port.master = None
        if announce:
            self.emit(LinkEvent.REMOVED, index)
        return True

    def sweep(self) -> None:
        """Apply what closing fds does in the kernel: a tap that is not
        persistent goes with its last queue; a persistent one that is up
        loses its carrier (IDLE)."""
        for link in list(self.links.values()):
            if link.kind != "tun":
                continue
            held = self.held(link)
            if not held and not link.persist:
                self.remove(link.index)
            elif held:
                link.was_held = True
            elif link.was_held:
                link.was_held = False
                if link.up:
                    self.emit(LinkEvent.IDLE, link.index)

    def taps(self) -> list[Link]:
        return [x for x in self.links.values() if x.kind == "tun"]

    def bridge(self, name: str) -> Bridge:
        link = self.by_name(name)
        if link is None or link.kind != "bridge":
            raise BridgeNotFound(f"bridge {name!r} does not exist")
        return Bridge(name=name, index=link.index, mtu=link.mtu)

    def close(self) -> None:
        for link in self.links.values():
            tun.close_all(link.ends)
            link.ends = []

    # -- events ---------------------------------------------------------------

    def emit(self, kind: LinkEvent, index: int) -> None:
        self.emitted.append((kind, index))
        if self._send is not None:
            self._send.send_nowait((kind, index))

    async def events(
        self,
        on_event: Callable[[LinkEvent, int], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """What :func:`tapd.netlink.link_events` does, from this kernel."""
        send, receive = trio.open_memory_channel[tuple[LinkEvent, int]](math.inf)
        self._send = send
        try:
            task_status.started()
            async with receive:
                async for kind, index in receive:
                    on_event(kind, index)
        finally:
            self._send = None

    # -- tun.unpersist ----------------------------------------------------------

    def unpersist(self, name: str, flags: int, index: int, path: str = "") -> tun.Unpersist:
        """:func:`tapd.tun.unpersist`: attach a queue by name, clear
        persistence, close the queue."""
        self.sweep()
        link = self.by_name(name)
        if link is None or link.index != index:
            return tun.Unpersist.GONE
        if self.held(link) and not link.multi_queue:
            return tun.Unpersist.HELD  # tun_attach(): EBUSY
        link.persist = False
        self.sweep()  # tapd's queue closes: the last one, or not
        return tun.Unpersist.CLEARED


class FakeNetlink:
    """What :class:`tapd.lifecycle.Lifecycle` (and the maker) ask of
    :class:`tapd.netlink.Netlink`, on a :class:`FakeKernel`.  ``fail[name]``
    makes that method raise; ``calls`` records (name, index)."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.calls: list[tuple[str, Any]] = []
        self.fail: dict[str, BaseException] = {}
        #: the host's own addresses on each bridge: (address, prefix length)
        self.host: dict[str, list[tuple[str, int]]] = {}

    def _call(self, name: str, arg: Any = None) -> None:
        self.calls.append((name, arg))
        self.kernel.sweep()
        exc = self.fail.get(name)
        if exc is not None:
            raise exc

    def called(self, name: str) -> list[Any]:
        return [arg for call, arg in self.calls if call == name]

    def _link(self, index: int) -> Link:
        link = self.kernel.links.get(index)
        if link is None:
            raise KernelError(f"no interface {index}")
        return link

    def present(self) -> set[int]:
        self._call("present")
        return set(self.kernel.links)

    def addresses(self) -> dict[int, str]:
        self._call("addresses")
        return {i: link.address for i, link in self.kernel.links.items() if link.kind == "tun"}

    def host_addresses(self, name: str) -> list[tuple[str, int]]:
        self._call("host_addresses", name)
        self.kernel.bridge(name)
        return list(self.host.get(name, []))

    def port_address(self, index: int) -> tuple[str, int | None] | None:
        self._call("port_address", index)
        link = self.kernel.links.get(index)
        return None if link is None else (link.address, link.master)

    def set_address(self, index: int, mac: str) -> bool:
        self._call("set_address", index)
        link = self.kernel.links.get(index)
        if link is None:
            return False
        link.address = mac
        return True

    def static_entries(self, bridge: int) -> set[tuple[int, str]]:
        self._call("static_entries", bridge)
        return {
            (link.index, link.static_mac)
            for link in self.kernel.links.values()
            if link.master == bridge and link.static_mac is not None
        }

    def _tun_info(self, link: Link | None) -> TunInfo | None:
        if link is None or link.kind != "tun":
            return None
        return TunInfo(
            owner=link.owner,
            group=link.group,
            persist=link.persist,
            multi_queue=link.multi_queue,
            queues=self.kernel.held(link),
            disabled=0,
        )

    def tun_info(self, index: int) -> TunInfo | None:
        self._call("tun_info", index)
        return self._tun_info(self.kernel.links.get(index))

    def tap_link(self, index: int) -> TapLink | None:
        self._call("tap_link", index)
        link = self.kernel.links.get(index)
        info = self._tun_info(link)
        if link is None or info is None:
            return None
        return TapLink(name=link.name, master=link.master, up=link.up, tun=info)

    def tun_link(self, index: int) -> TunLink | None:
        self._call("tun_link", index)
        link = self.kernel.links.get(index)
        info = self._tun_info(link)
        if link is None or info is None:
            return None
        flags = TAP_FLAGS | (tun.IFF_MULTI_QUEUE if link.multi_queue else 0)
        return TunLink(name=link.name, info=info, flags=flags)

    def give_back(self, index: int) -> bool:
        self._call("give_back", index)
        link = self.kernel.links.get(index)
        if link is None:
            return False
        # Off the bridge (port flags and FDB entry go with the port), down, untagged.
        link.master, link.up, link.alias = None, False, ""
        link.port_flags, link.static_mac = None, None
        link.vlans, link.static_vlan = {}, None
        return True

    def delete(self, index: int) -> bool:
        self._call("delete", index)
        return self.kernel.remove(index)

    def set_port(
        self, index: int, flags: dict[str, bool], static_mac: str | None, vlan: int | None = None
    ) -> None:
        self._call("set_port", index)
        link = self._link(index)
        if link.master is None:
            raise KernelError(f"interface {index} is no bridge port")
        link.port_flags, link.static_mac, link.static_vlan = dict(flags), static_mac, vlan

    def vlan_filtering(self, bridge: str) -> bool:
        self._call("vlan_filtering", bridge)
        self.kernel.bridge(bridge)
        link = self.kernel.by_name(bridge)
        assert link is not None
        return link.vlan_filtering

    def set_vlans(self, index: int, access: int | None, tagged: tuple[int, ...]) -> dict[int, int]:
        self._call("set_vlans", index)
        link = self._link(index)
        if link.master is None:
            raise KernelError(f"interface {index} is no bridge port")
        want = wanted_vlans(access, tagged)
        changed = {vid: flags for vid, flags in link.vlans.items() if want.get(vid) != flags}
        changed.update({vid: -1 for vid in want if vid not in link.vlans})
        link.vlans = want
        link.vlans_set_up.append(link.up)
        return changed

    def shape(self, index: int, ingress: int | None, egress: int | None) -> None:
        self._call("shape", index)
        link = self._link(index)
        link.qdiscs = (ingress, egress)
        if egress is not None and self.kernel.by_name(ifb_name(index)) is None:
            self.kernel.add(ifb_name(index), kind="ifb", up=True)

    def unshape(self, index: int, tap_too: bool = False) -> None:
        self._call("unshape", index)
        link = self.kernel.links.get(index)
        if tap_too and link is not None:
            link.qdiscs = None
        ifb = self.kernel.by_name(ifb_name(index))
        if ifb is not None and ifb.kind == "ifb":
            self.kernel.remove(ifb.index)

    def bring_up(self, index: int) -> None:
        self._call("bring_up", index)
        self._link(index).up = True

    def tagged_taps(self) -> list[tuple[int, str, str]]:
        self._call("tagged_taps")
        return [(x.index, x.name, x.alias) for x in self.kernel.taps() if x.alias]

    def orphan_ifbs(self) -> list[int]:
        self._call("orphan_ifbs")
        links = self.kernel.links
        return [
            x.index
            for x in links.values()
            if x.kind == "ifb" and (tap := ifb_tap(x.name)) is not None and tap not in links
        ]

    def cached_bridge(self, name: str) -> Bridge | None:
        return None

    def bridge(self, name: str) -> Bridge:
        self._call("bridge", name)
        return self.kernel.bridge(name)


class Hold:
    """A step of the fake maker that waits until :meth:`release`."""

    def __init__(self) -> None:
        self.waiting = 0
        self._released = trio.Event()
        self._arrived = trio.Event()

    async def wait(self) -> None:
        self.waiting += 1
        self._arrived.set()
        self._arrived = trio.Event()
        try:
            await self._released.wait()
        finally:
            self.waiting -= 1

    async def reached_by(self, count: int) -> None:
        """Until ``count`` calls wait here."""
        while self.waiting < count:
            await self._arrived.wait()

    def release(self) -> None:
        self._released.set()


class FakeMaker:
    """A :class:`tapd.making.TapMaker` on a :class:`FakeKernel`.

    ``calls`` records each step as (step, bridge or ifname); ``fail[step]``
    makes a step raise before it touches the kernel (as the real one leaves
    nothing behind when it fails); :meth:`hold` makes a step wait."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, BaseException] = {}
        self.holds: dict[str, Hold] = {}
        self._names = itertools.count(1)

    def hold(self, step: str) -> Hold:
        hold = self.holds[step] = Hold()
        return hold

    async def _step(self, step: str, what: str) -> None:
        self.calls.append((step, what))
        await trio.lowlevel.checkpoint()
        hold = self.holds.get(step)
        if hold is not None:
            await hold.wait()
        exc = self.fail.get(step)
        if exc is not None:
            raise exc

    def _new(self, spec: TapSpec, persist: bool) -> tuple[Link, Bridge]:
        bridge = self.kernel.bridge(spec.bridge)
        name = spec.ifname or spec.name_template.format(
            rand=f"{next(self._names):08x}", uid=spec.owner_uid or 0
        )
        link = self.kernel.add(
            name,
            alias=spec.alias or "",
            vlans={1: ACCESS},
            master=bridge.index,
            up=spec.up,
            persist=persist,
            multi_queue=spec.queues > 1,
            owner=spec.owner_uid,
            group=spec.owner_gid,
            mtu=bridge.mtu,
        )
        return link, bridge

    def _made(self, link: Link, bridge: Bridge, fds: list[int], spec: Any) -> MadeTap:
        vnet_hdr = getattr(spec, "vnet_hdr", None) is not False
        made = MadeTap.new(link.name, fds, vnet_hdr, bridge)
        made.ifindex = link.index
        made.sndbuf = min(spec.sndbuf or tun.SNDBUF_DEFAULT, tun.SNDBUF_DEFAULT)
        if spec.vhost is not None:
            made.vhost_fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in fds]
        return made

    async def make(self, spec: TapSpec) -> MadeTap:
        await self._step("make", spec.bridge)
        link, bridge = self._new(spec, persist=False)
        return self._made(link, bridge, [self.kernel.queue(link) for _ in range(spec.queues)], spec)

    async def prepare(self, spec: TapSpec) -> MadeTap:
        await self._step("prepare", spec.bridge)
        link, bridge = self._new(spec, persist=True)
        return self._made(link, bridge, [], spec)

    async def adopt(self, spec: AdoptSpec) -> MadeTap:
        await self._step("adopt", spec.bridge)
        links = {self.kernel.by_fd(fd) for fd in spec.fds}
        if None in links:
            raise NotATap("an fd sent with the request is not a tap queue")
        if len(links) != 1:
            raise NotATap("the fds sent with the request are queues of different devices")
        (link,) = links
        assert link is not None
        if link.index in spec.leased:
            raise TapLeased(f"tap {link.name!r} already has a lease; it cannot be adopted again")
        if spec.require_owner is not None:
            netlink = FakeNetlink(self.kernel)
            problem = adoption_problem(link.name, netlink.tap_link(link.index), spec.require_owner)
            if problem is not None:
                raise Denied(problem)
        bridge = self.kernel.bridge(spec.bridge)
        if spec.owner_uid is not None:
            link.owner = spec.owner_uid
        if spec.owner_gid is not None:
            link.group = spec.owner_gid
        link.master, link.alias, link.up, link.mtu = (
            bridge.index,
            spec.alias or "",
            spec.up,
            bridge.mtu,
        )
        link.vlans = {1: ACCESS}
        return self._made(link, bridge, list(spec.fds), spec)

    async def discard(self, made: MadeTap, persistent: bool = False) -> None:
        self.calls.append(("discard", made.ifname))
        with trio.CancelScope(shield=True):
            await trio.lowlevel.checkpoint()
        if persistent:
            self.kernel.remove(made.ifindex)
        else:
            made.close()
            self.kernel.sweep()


class InlineWorker:
    """:class:`tapd.worker.KernelWorker` without its thread: each job runs on
    the loop, then yields (shielded, as the real one cannot be cancelled
    once it has the job)."""

    def __init__(self) -> None:
        self.busy = 0
        self.jobs: list[str] = []

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        self.jobs.append(getattr(fn, "__name__", repr(fn)))
        self.busy += 1
        try:
            result = outcome.capture(fn, *args)
            with trio.CancelScope(shield=True):
                await trio.lowlevel.checkpoint()
        finally:
            self.busy -= 1
        return result.unwrap()

    def close(self) -> None:
        pass


class FakeClosers:
    """:class:`tapd.closer.Closers` that close at once, and count."""

    def __init__(self) -> None:
        self.healthy = True
        self.stuck: list[Any] = []
        self.closed = 0
        self.sockets = 0

    def give(self, fds: Iterable[int], whose: str) -> None:
        fds = list(fds)
        tun.close_all(fds)
        self.closed += len(fds)

    def give_socket(self, sock: socket.socket, whose: str) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        self.sockets += 1


@dataclass
class Event:
    level: str
    event: str
    fields: dict[str, Any]


class EventLog:
    """A structlog logger's calls, kept: ``named("lease.ended")``."""

    def __init__(self, events: list[Event] | None = None, **bound: Any) -> None:
        self.events: list[Event] = [] if events is None else events
        self._bound = bound

    def bind(self, **more: Any) -> EventLog:
        return EventLog(self.events, **self._bound, **more)

    def _log(self, level: str, event: str, fields: dict[str, Any]) -> None:
        self.events.append(Event(level, event, {**self._bound, **fields}))

    def debug(self, event: str, **fields: Any) -> None:
        self._log("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log("error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log("exception", event, fields)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e.fields for e in self.events if e.event == event]

    def names(self) -> list[str]:
        return [e.event for e in self.events]


# -- processes and programs ------------------------------------------------------


def open_fds() -> set[int]:
    """This process's open fds (to find leaks)."""
    return {int(x) for x in os.listdir("/proc/self/fd")}


@contextlib.contextmanager
def process() -> Iterator[subprocess.Popen[bytes]]:
    """A child that lives until killed (a VMM, a libvirt daemon)."""
    proc = subprocess.Popen(["sleep", "3600"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def peer(pid: int | None = None, uid: int | None = None, groups: tuple[int, ...] = ()) -> Peer:
    """A peer as the kernel would report it: the real process ``pid`` (default
    this one) with a pidfd, under ``uid`` (default ours: policy and owner
    checks see what the test says).  The caller closes ``pidfd``."""
    pid = os.getpid() if pid is None else pid
    return Peer(
        uid=os.getuid() if uid is None else uid,
        gid=os.getgid(),
        pid=pid,
        groups=groups,
        pidfd=os.pidfd_open(pid),
    )


class Programs:
    """Scripts and an nft(8) in a directory, recording how they were run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "ran.log"
        self.nft_log = root / "nft.log"
        self.listing = root / "nft-listing.json"
        self.nft = self._script(
            "nft",
            f'if [ "$2" = list ]; then cat {self.listing} 2>/dev/null || exit 1; exit 0; fi\n'
            f"cat >> {self.nft_log}; echo >> {self.nft_log}\n",
        )

    def _script(self, name: str, body: str) -> str:
        path = self.root / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
        return str(path)

    def hook(self, name: str, status: int = 0) -> str:
        """A script that records ``NAME IFNAME`` and exits ``status``."""
        return self._script(name, f'echo "{name} $1" >> {self.log}\nexit {status}\n')

    def ran(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def nft_documents(self) -> list[str]:
        text = self.nft_log.read_text() if self.nft_log.exists() else ""
        return [line for line in text.splitlines() if line.strip()]


# -- the stack above the kernel ----------------------------------------------------


@dataclass
class Stack:
    """tapd above the kernel, on the fakes: Service over the fake maker, the
    Lifecycle on the fake netlink, running."""

    kernel: FakeKernel
    netlink: FakeNetlink
    maker: FakeMaker
    worker: InlineWorker
    lifecycle: Lifecycle
    service: Service
    log: EventLog
    nursery: trio.Nursery


@contextlib.asynccontextmanager
async def stack(
    config: Config,
    kernel: FakeKernel | None = None,
    fail: dict[str, BaseException] | None = None,
) -> AsyncIterator[Stack]:
    """A running :class:`Stack`; ``kernel`` may hold taps already (a restart),
    and ``fail`` names netlink methods that raise from the start."""
    kernel = FakeKernel() if kernel is None else kernel
    netlink = FakeNetlink(kernel)
    netlink.fail.update(fail or {})
    maker = FakeMaker(kernel)
    worker = InlineWorker()
    lifecycle = Lifecycle(
        config,
        worker,  # type: ignore[arg-type]
        netlink,  # type: ignore[arg-type]
        events=kernel.events,
        unpersist=kernel.unpersist,
    )
    log = EventLog()
    lifecycle.log = log
    service = Service(config, maker, lifecycle)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lifecycle.run)
            yield Stack(kernel, netlink, maker, worker, lifecycle, service, log, nursery)
            nursery.cancel_scope.cancel()
    finally:
        kernel.close()
