"""Leases from grant to the tap's end: netlink events, owner processes, restarts.

A lease ends when its tap goes away, which tapd learns from RTM_DELLINK, never
by polling.  At start, :meth:`Lifecycle.reconcile` rebuilds the leases from
the tags on the interfaces themselves.

The owner rule.  A VM may make its tap persistent (TUNSETPERSIST needs no
privilege on an fd it holds), so a tap could outlive every process that used
it; tapd watches each lease's owner through a pidfd to prevent that.  But the
owner is not always the tap's only user: libvirt runs the bridge helper and
passes the fd on to QEMU, so the owner is libvirt's daemon, which exits and
restarts under running VMs.  Removing the tap when the owner exits would cut
a running VM off.  So the rule is: **a tap lives while its owner lives or
while any process holds one of its queues; once neither is true it goes.**

tapd cannot see who holds an fd (under its hardened unit it may not read
other users' /proc/PID/fd), and it need not: the kernel knows.  When the
owner is gone, tapd clears the tap's persistence by attaching a queue of its
own (CAP_NET_ADMIN may, drivers/net/tun.c: tun_not_capable()) and closing it
(:func:`tapd.tun.unpersist`).  A non-persistent tap is unregistered by the
kernel as its last queue closes, so from then on it lives exactly as long as
someone holds it; a single-queue tap still held refuses the attach (EBUSY),
which says the same.  A holder can make the tap persistent again; when a
persistent tap's last queue closes it loses its carrier (__tun_detach()),
netlink announces that (:attr:`~tapd.netlink.LinkEvent.IDLE`), and tapd
clears its persistence again, which now removes it.  A tap the client made
(``fd=``/``fds=``) is never removed: once its owner is gone and no queue is
held, it is given back, off the bridge and untagged.

Races with the kernel.  Events can only be acted on for leases tapd knows,
and the kernel may drop events (ENOBUFS).  So whenever tapd may have missed
something - after rebuilding its leases at start, after an overrun - it
looks at the kernel again (:meth:`Lifecycle._resync`), and judges only the
leases it knew before it looked.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from pydantic import BaseModel

from . import log as logging
from . import nft, owner, programs, tun
from .config import Config
from .errors import TapdError, TapLeased
from .fence import TAP_PREFIX, Fence
from .leases import Lease, Registry, parse_tag
from .netlink import LinkEvent, Netlink, link_events
from .owner import Owner
from .taps import random_mac
from .worker import KernelWorker

#: A tap whose address tapd had to put back this many times within
#: READDRESS_WINDOW seconds is taken from its holder (deleted; a tap the
#: client made is given back, off the bridge).  A VMM that sets its tap's
#: address once (cloud-hypervisor's ``host_mac``) is put back and goes on;
#: one that sets it in a loop would otherwise hold another's address nearly
#: all the time, tapd's reset notwithstanding.
READDRESS_STRIKES = 3
READDRESS_WINDOW = 60.0
#: ... and its uid gets no tap on that bridge for this long after (a new tap
#: would otherwise give it three more resets at once, again and again)
READDRESS_COOL_OFF = 60.0


@dataclass
class Grant:
    """A reply ready to send, and the lease it starts.  After sending,
    :meth:`sent`; if it could not be delivered, :meth:`abandon` undoes what
    the request did (:meth:`Lifecycle.undo`)."""

    reply: BaseModel
    fds: list[int] = field(default_factory=list)
    lease: Lease | None = None
    lifecycle: Lifecycle | None = None
    #: logs the grant: called once the reply is out, so that the client is
    #: not kept waiting for the log line (the lease is tracked before)
    on_sent: Callable[[], None] | None = None
    #: the allow rule that granted a tap (for the metrics)
    rule: str | None = None

    def sent(self) -> None:
        # Our copies go: once the VM closes its own, the tap is gone.
        tun.close_all(self.fds)
        self.fds = []
        if self.on_sent is not None:
            self.on_sent()
            self.on_sent = None

    async def abandon(self) -> None:
        if self.lease is not None and self.lifecycle is not None:
            await self.lifecycle.undo(self.lease)
        self.on_sent = None  # never delivered: request.undelivered says so
        self.sent()


class _OnePerTap:
    """Work on a tap that runs once at a time per tap: asked for again while
    it runs (an event came meanwhile, which the run may not have seen), it
    runs once more when done."""

    def __init__(self) -> None:
        self._running: set[int] = set()
        self._again: set[int] = set()

    async def run(
        self, index: int, wanted: Callable[[], bool], once: Callable[[], Awaitable[bool]]
    ) -> None:
        """``once()`` while ``wanted()``, for as long as asked again meanwhile;
        ``once`` returns False to give up."""
        if index in self._running:
            self._again.add(index)
            return
        self._running.add(index)
        try:
            while wanted():
                self._again.discard(index)
                if not await once() or index not in self._again:
                    return
        finally:
            self._running.discard(index)
            self._again.discard(index)


class Lifecycle:
    def __init__(
        self,
        config: Config,
        worker: KernelWorker,
        netlink: Netlink,
        *,
        events: Callable[..., Awaitable[None]] = link_events,
        unpersist: Callable[[str, int, int, str], tun.Unpersist] = tun.unpersist,
    ) -> None:
        self.config = config
        self.worker = worker
        self.netlink = netlink
        #: the kernel's link events, and its way of clearing an orphan's
        #: persistence (tests of everything above the kernel pass fakes)
        self._events = events
        self._unpersist_tap = unpersist
        self.registry = Registry()
        self.log = logging.get()
        self._watches: dict[int, trio.CancelScope] = {}
        #: leases (by ifindex) whose owner is gone: their taps live while held
        self._orphans: set[int] = set()
        #: orphans being settled now (and whether to settle them again)
        self._settling = _OnePerTap()
        #: orphans whose settling failed: not retried on every event (tapd's
        #: own queue closing would announce one), only by a resync
        self._stuck: set[int] = set()
        self._resync_lock = trio.Lock()
        #: taps whose address is being put back (and whether to look again)
        self._readdressing = _OnePerTap()
        #: when tapd put each leased tap's address back (within the window)
        self._resets: dict[int, list[float]] = {}
        #: (uid, bridge) whose tap was revoked, and until when it gets none
        self._cooling: dict[tuple[int, str], float] = {}
        #: why tapd is removing a leased tap, for its lease's end
        self._ending: dict[int, str] = {}
        self._resync_wanted = False
        self._nursery: trio.Nursery | None = None
        #: what reconcile() found, for the metrics: restored, orphaned
        self.reconciled: Counter[str] = Counter()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # Listening before reconciling: whatever happens after the dump
            # either arrives as an event or shows in the look that follows.
            await nursery.start(self._events, self._link_event)
            await self.reconcile()
            nursery.start_soon(self._check_addresses)
            task_status.started()

    # -- events ----------------------------------------------------------------

    def _link_event(self, kind: LinkEvent, index: int) -> None:
        if kind is LinkEvent.OVERRUN:
            self.log.warning("link.events.overrun")
            self._resync_wanted = True
            self._spawn(self._resync_while_wanted)
            self._spawn(self._check_addresses)
            return
        if kind is LinkEvent.ADDRESS:
            lease = self.registry.get(index)
            if lease is not None:
                self._spawn(self._readdress, index)
            return
        if kind is LinkEvent.REMOVED:
            lease = self.registry.pop(index)
            if lease is not None:
                self._ended(lease, "tap-removed")
            return
        # IDLE: a tap's last queue closed.  Only an orphan's matters (an
        # owner that lives keeps its tap, persistent or not).
        lease = self.registry.get(index)
        if lease is not None and index in self._orphans and index not in self._stuck:
            self._spawn(self._settle, index)

    async def _resync_while_wanted(self) -> None:
        """Look again after an overrun; overruns during a look ask for
        another (one look at a time, each judging what it knew before)."""
        while self._resync_wanted:
            self._resync_wanted = False
            await self._resync()

    async def _resync(self) -> None:
        """End the leases whose tap is gone, and settle every orphan, by a
        fresh look at the kernel.  Only leases known before the dump began
        are judged: a tap made since may be missing from it."""
        async with self._resync_lock:
            known = self.registry.visible_to(0)
            try:
                present = await self.worker.run(self.netlink.present)
            except Exception:
                self.log.exception("lease.resync.failed")
                return
            ended = settled = 0
            for lease in known:
                if self.registry.get(lease.ifindex) is not lease:
                    continue
                if lease.ifindex not in present:
                    self.registry.pop(lease.ifindex)
                    self._ended(lease, "tap-removed")
                    ended += 1
                elif lease.ifindex in self._orphans:
                    self._stuck.discard(lease.ifindex)
                    await self._settle(lease.ifindex)
                    settled += 1
            self.log.info("lease.resync.complete", known=len(known), ended=ended, settled=settled)

    def _ended(self, lease: Lease, reason: str) -> None:
        scope = self._watches.pop(lease.ifindex, None)
        if scope is not None:
            scope.cancel()
        self._orphans.discard(lease.ifindex)
        self._stuck.discard(lease.ifindex)
        self._resets.pop(lease.ifindex, None)
        if reason == "tap-removed":
            reason = self._ending.pop(lease.ifindex, reason)
        self._ending.pop(lease.ifindex, None)
        self.log.info(
            "lease.ended", lease=lease.id, ifname=lease.ifname, uid=lease.uid, reason=reason
        )
        if lease.downscript:
            self._spawn(self._downscript, lease)
        fence = Fence.from_tag(lease.fence)
        if fence.egress is not None:
            # The tap's own qdiscs went with it; the ifb that shaped what its
            # guest sent is a device of its own.
            self._spawn(self._unshape, lease)
        if fence.ip_filter:
            self._spawn(self._unfilter, lease.ifindex)

    async def _downscript(self, lease: Lease) -> None:
        assert lease.downscript is not None
        path = self.config.programs.hooks.get(lease.downscript)
        if path is None:
            self.log.warning("hook.downscript.missing", lease=lease.id, script=lease.downscript)
            return
        try:
            await programs.run_hook(
                lease.downscript, path, lease.ifname, self.config.programs.hook_timeout
            )
        except Exception as exc:
            self.log.warning("hook.downscript.failed", lease=lease.id, error=str(exc))
        else:
            self.log.info("hook.downscript.complete", lease=lease.id, ifname=lease.ifname)

    def _spawn(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None, "Lifecycle.run() is not running"
        self._nursery.start_soon(fn, *args)

    # -- tap addresses ---------------------------------------------------------

    async def _readdress(self, index: int) -> None:
        """Put back a leased tap's address after its holder changed it.

        A VMM may set its tap's address through its fd (SIOCSIFHWADDR needs
        no privilege there, drivers/net/tun.c), and the bridge takes a port's
        address as its own, displacing any entry it had for it: a fenced
        guest's static and sticky one too (net/bridge/br_fdb.c:
        br_fdb_changeaddr(), fdb_add_local()).  Frames for that address then
        stay on the host, and the fenced guest's own are dropped at its
        locked port.  No port flag or tun flag forbids the change, so tapd
        undoes it: a fresh address of its own (which removes the bridge's
        local entry), then the static entries of the bridge's fenced leases
        that are missing.  One at a time per tap; events meanwhile run it
        again (a holder may change its address in a loop)."""

        async def once() -> bool:
            # The lease now on the tap (a tap given back may be adopted again
            # meanwhile: the new lease's change is looked at, not dropped).
            lease = self.registry.get(index)
            if lease is None:
                return False
            try:
                await self._readdress_once(lease)
            except Exception:
                self.log.exception(
                    "lease.address.reset.failed", lease=lease.id, ifname=lease.ifname
                )
            return True

        await self._readdressing.run(index, lambda: self.registry.get(index) is not None, once)

    async def _readdress_once(self, lease: Lease) -> None:
        found = await self.worker.run(self.netlink.port_address, lease.ifindex)
        if found is None:
            return  # gone: its RTM_DELLINK ends the lease
        seen, master = found
        if not _tap_address(seen):
            mac = random_mac()
            if not await self.worker.run(self.netlink.set_address, lease.ifindex, mac):
                return
            if self.registry.get(lease.ifindex) is not lease:
                return  # ended meanwhile: nothing to count against it
            self.log.warning(
                "lease.address.reset",
                lease=lease.id,
                ifname=lease.ifname,
                uid=lease.uid,
                seen=seen,
                address=mac,
            )
            if self._strike(lease.ifindex) >= READDRESS_STRIKES:
                self.log.warning(
                    "lease.revoked",
                    lease=lease.id,
                    ifname=lease.ifname,
                    uid=lease.uid,
                    reason="readdressed",
                    resets=READDRESS_STRIKES,
                    seconds=READDRESS_WINDOW,
                )
                self._cool_off(lease.uid, lease.bridge)
                try:
                    await self.release(lease, "revoked")
                except Exception:
                    self.log.exception("lease.revoke.failed", lease=lease.id, ifname=lease.ifname)
        # Even when the address is tapd's again (its holder may have moved on
        # before tapd looked), what it displaced on the way is still missing.
        if master is not None:
            await self._restore_static_entries(lease.bridge, master)

    def _cool_off(self, uid: int, bridge: str) -> None:
        now = trio.current_time()
        for key in [k for k, until in self._cooling.items() if until <= now]:
            del self._cooling[key]
        self._cooling[(uid, bridge)] = now + READDRESS_COOL_OFF

    def cooling_off(self, uid: int, bridge: str) -> float | None:
        """Seconds before ``uid`` may have a tap on ``bridge`` again, after
        one of its taps there was revoked; None if it may now."""
        left = self._cooling.get((uid, bridge), 0.0) - trio.current_time()
        return left if left > 0 else None

    def _strike(self, index: int) -> int:
        """Count a reset of tap ``index``'s address: how many in the window."""
        now = trio.current_time()
        recent = [t for t in self._resets.get(index, []) if now - t < READDRESS_WINDOW]
        recent.append(now)
        self._resets[index] = recent
        return len(recent)

    async def _restore_static_entries(self, bridge: str, index: int) -> None:
        """Add back the static FDB entry of every lease filtering MACs on
        ``bridge`` (interface ``index``) that lacks it: one dump, then one
        add for each missing."""
        fenced = [
            lease
            for lease in self.registry.visible_to(0)
            if lease.bridge == bridge
            and lease.guest_mac
            and Fence.from_tag(lease.fence).mac_filtering
        ]
        if not fenced:
            return
        present = await self.worker.run(self.netlink.static_entries, index)
        for lease in fenced:
            if (lease.ifindex, lease.guest_mac) in present:
                continue
            if self.registry.get(lease.ifindex) is not lease:
                continue
            try:
                await self.worker.run(
                    self.netlink.set_port,
                    lease.ifindex,
                    {},
                    lease.guest_mac,
                    Fence.from_tag(lease.fence).vlan,
                )
            except Exception:
                self.log.exception("lease.fdb.restore.failed", lease=lease.id, ifname=lease.ifname)
            else:
                self.log.warning(
                    "lease.fdb.restored",
                    lease=lease.id,
                    ifname=lease.ifname,
                    guest_mac=lease.guest_mac,
                )

    async def _check_addresses(self) -> None:
        """Look at every leased tap's address (at start, and after lost
        events): any that is not tapd's is put back as :meth:`_readdress` does."""
        try:
            addresses = await self.worker.run(self.netlink.addresses)
        except Exception:
            self.log.exception("lease.address.check.failed")
            return
        for lease in self.registry.visible_to(0):
            address = addresses.get(lease.ifindex)
            if address is not None and not _tap_address(address):
                self._spawn(self._readdress, lease.ifindex)

    # -- grants ----------------------------------------------------------------

    def begin(self, lease: Lease, pidfd: int) -> None:
        """Start tracking ``lease``; takes ownership of ``pidfd``.  An
        interface has at most one lease: a second is refused (two adoptions
        of one tap that raced past the check in tapd.taps)."""
        if self.registry.get(lease.ifindex) is not None:
            os.close(pidfd)
            raise TapLeased(f"tap {lease.ifname!r} already has a lease")
        self.registry.add(lease)
        scope = trio.CancelScope()
        self._watches[lease.ifindex] = scope
        # No log event here: request.granted (or lease.restored) names the lease.
        self._spawn(self._watch, lease, pidfd, scope)

    async def start(self, lease: Lease, owner_: Owner) -> None:
        """Fence ``lease``'s tap as its rule says, bring its port up, and track
        the lease (taking the owner's pidfd).  On failure what the fence set
        up is taken down again; the tap itself stays the caller's to discard."""
        try:
            if lease.fence:
                # The port joined down (a disabled port: the bridge drops what
                # arrives on it) and comes up fenced.  Whoever may attach to
                # the tap already - an adopted tap's client, a prepared or
                # multi-queue tap's owner - never has a moment on an open port.
                await self._fence(lease)
            # Tracked before the reply goes out: the VM may close its fds (and
            # the kernel announce the tap's end) the moment it has them.
            self.begin(lease, owner_.take())
        except BaseException:
            # A tap another request leased meanwhile (two adoptions of one
            # tap) is left to that lease.
            if self.registry.get(lease.ifindex) is None:
                with trio.CancelScope(shield=True):
                    await self._unfence(lease)
            raise

    async def undo(self, lease: Lease) -> None:
        """A grant was never delivered: forget its lease and remove the tap
        tapd made for it (give back one the client made), with its ifb,
        address filter and downscript.  Closing tapd's own fds is not enough:
        a client that received part of a split reply holds queues, and could
        make them persistent."""
        if self.registry.get(lease.ifindex) is not lease:
            return
        self.registry.pop(lease.ifindex)
        self._resets.pop(lease.ifindex, None)
        scope = self._watches.pop(lease.ifindex, None)
        if scope is not None:
            scope.cancel()
        self._orphans.discard(lease.ifindex)
        if not lease.adopted:
            try:
                await self.worker.run(self.netlink.delete, lease.ifindex)
            except Exception:
                self.log.exception("lease.remove.failed", lease=lease.id)
        # The lease was forgotten before its tap went, so _ended() never sees
        # it: what its fence made beside the tap goes here.
        await self._unfence(lease)
        if lease.downscript:
            await self._downscript(lease)

    async def _unfence(self, lease: Lease) -> None:
        """Undo what :meth:`start` and the join set up, for a lease that did
        not start or was never delivered: an adopted tap off the bridge, no
        ifb, no address filter.  Each step is tried and logged; the error
        that got here is the one the client sees."""
        fence = Fence.from_tag(lease.fence)
        if lease.adopted:
            try:
                await self.worker.run(self.netlink.give_back, lease.ifindex)
            except Exception:
                self.log.exception("lease.unfence.failed", lease=lease.id)
        if fence.shaped:
            await self._unshape(lease, tap_too=lease.adopted)
        if fence.ip_filter:
            # Most likely never loaded if this fails; reconcile drops orphans.
            await self._unfilter(lease.ifindex)

    async def _watch(self, lease: Lease, pidfd: int, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)
        if scope.cancel_called or self.registry.get(lease.ifindex) is not lease:
            return
        self._watches.pop(lease.ifindex, None)
        self.log.info("lease.owner.exited", lease=lease.id, ifname=lease.ifname, pid=lease.pid)
        self._orphans.add(lease.ifindex)
        await self._settle(lease.ifindex)

    # -- the owner rule ---------------------------------------------------------

    async def _settle(self, index: int) -> None:
        """Apply the owner rule to the orphan on tap ``index`` (see the
        module's docstring).  One settling per tap at a time; an event during
        it runs it again, for whichever lease the tap has by then (a tap given
        back may be adopted again meanwhile)."""

        def orphan() -> Lease | None:
            return self.registry.get(index) if index in self._orphans else None

        async def once() -> bool:
            lease = orphan()
            if lease is None:
                return False
            try:
                await self._settle_once(lease)
            except Exception:
                self._stuck.add(index)
                self.log.exception("lease.settle.failed", lease=lease.id, ifname=lease.ifname)
                return False
            return True

        await self._settling.run(index, lambda: orphan() is not None, once)

    async def _settle_once(self, lease: Lease) -> None:
        if lease.adopted:
            info = await self.worker.run(self.netlink.tun_info, lease.ifindex)
            if self.registry.get(lease.ifindex) is not lease:
                return  # ended meanwhile; the tap may be another lease's now
            if info is None:
                self._vanished(lease)
            elif not info.held:
                await self._give_back(lease, "owner-exited")
            else:
                self.log.info("lease.kept", lease=lease.id, ifname=lease.ifname, reason="in-use")
            return
        outcome = await self.worker.run(self._unpersist, lease.ifindex)
        if outcome is tun.Unpersist.GONE:
            self._vanished(lease)
        elif self.registry.get(lease.ifindex) is not lease:
            return  # its RTM_DELLINK came meanwhile
        elif outcome is tun.Unpersist.CLEARED:
            # Removed now if tapd's queue was the last (RTM_DELLINK ends the
            # lease), else when the last holder closes its queue.
            self.log.info("lease.unpersisted", lease=lease.id, ifname=lease.ifname)
        else:
            # HELD, or not persistent and still there: in use; it goes (and
            # its lease ends) as its last queue closes.
            self.log.info("lease.kept", lease=lease.id, ifname=lease.ifname, reason="in-use")

    def _unpersist(self, index: int) -> tun.Unpersist | None:
        """(Kernel thread.)  Clear an orphan tap's persistence; None when it
        is not persistent (it goes with its last queue: nothing to do)."""
        link = self.netlink.tun_link(index)
        if link is None:
            return tun.Unpersist.GONE
        if not link.info.persist:
            return None
        return self._unpersist_tap(link.name, link.flags, index, self.config.taps.tun_device)

    def _vanished(self, lease: Lease) -> None:
        """The tap is gone and its RTM_DELLINK not handled yet (or lost)."""
        if self.registry.get(lease.ifindex) is lease:
            self.registry.pop(lease.ifindex)
            self._ended(lease, "tap-removed")

    async def _give_back(self, lease: Lease, reason: str) -> None:
        """A tap the client made: off the bridge and untagged, then the lease
        ends (in that order: a tapd killed in between finds the tag again).
        Its port flags and FDB entry go with the port; its qdiscs stay with
        the tap unless taken off here (its ifb and address filter go as the
        lease ends)."""
        if Fence.from_tag(lease.fence).shaped:
            try:
                await self.worker.run(self.netlink.unshape, lease.ifindex, True)
            except Exception:
                self.log.exception("lease.unshape.failed", lease=lease.id)
        present = await self.worker.run(self.netlink.give_back, lease.ifindex)
        if self.registry.get(lease.ifindex) is lease:
            self.registry.pop(lease.ifindex)
            self._ended(lease, reason if present else "tap-removed")

    async def _unshape(self, lease: Lease, tap_too: bool = False) -> None:
        try:
            await self.worker.run(self.netlink.unshape, lease.ifindex, tap_too)
        except Exception:
            self.log.exception("lease.unshape.failed", lease=lease.id)

    async def _unfilter(self, ifindex: int) -> None:
        """Take a lease's address filter (its nftables chain) away."""
        try:
            await programs.run_nft(self.config.programs.nft, nft.remove_lease(ifindex))
        except Exception as exc:
            self.log.warning("lease.unfilter.failed", ifindex=ifindex, error=str(exc))
        else:
            self.log.info("lease.unfiltered", ifindex=ifindex)

    async def _unfilter_orphans(self) -> None:
        path = self.config.programs.nft
        if not os.access(path, os.X_OK):
            return  # no nft here: no rule filters addresses, and none can be left
        listing = await programs.list_nft_table(path, "bridge", nft.TABLE)
        leased = {lease.ifindex for lease in self.registry.visible_to(0)}
        for ifindex in nft.leased_indexes(listing or {}):
            if ifindex not in leased:
                await self._unfilter(ifindex)

    def _fence_steps(self, lease: Lease) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
        """What ``lease``'s rule asks for, one named step each, in order: the
        port's flags (with mac_filtering, the static FDB entry that lets its
        guest_mac through the locked port), the tap's rates, the address
        filter.  Each is idempotent."""
        fence = Fence.from_tag(lease.fence)
        index = lease.ifindex
        mac = lease.guest_mac if fence.mac_filtering else None
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        if fence.vlans:
            # First: the static FDB entry goes in the access VLAN.
            steps.append(("vlans", lambda: self._set_vlans(lease, fence)))
        steps.append(
            ("port", lambda: self.worker.run(
                self.netlink.set_port, index, fence.port_flags(), mac, fence.vlan))
        )  # fmt: skip
        if fence.shaped:
            steps.append(
                ("shaping", lambda: self.worker.run(
                    self.netlink.shape, index, fence.ingress, fence.egress))
            )  # fmt: skip
        if fence.ip_filter:
            document = nft.lease_rules(index, lease.guest_mac, lease.guest_ips)
            steps.append(("filter", lambda: programs.run_nft(self.config.programs.nft, document)))
        return steps

    async def _set_vlans(self, lease: Lease, fence: Fence) -> None:
        """The port's VLANs as its lease says; any it had otherwise (the
        bridge's default on a fresh port; a change behind tapd's back on a
        restored one) are put right."""
        changed = await self.worker.run(
            self.netlink.set_vlans, lease.ifindex, fence.vlan, fence.vlan_tagged
        )
        if changed and self.registry.get(lease.ifindex) is lease:
            # A restored lease's port was changed while tapd was away.
            self.log.warning(
                "lease.vlans.repaired",
                lease=lease.id,
                ifname=lease.ifname,
                vlan=fence.vlan,
                vlan_tagged=list(fence.vlan_tagged) or None,
                was=sorted(changed),
            )

    async def _fence(self, lease: Lease) -> None:
        """Fence ``lease``'s tap, then bring its port up; the first step that
        fails stops the grant."""
        for _, step in self._fence_steps(lease):
            await step()
        await self.worker.run(self.netlink.bring_up, lease.ifindex)

    async def _refence(self, lease: Lease) -> None:
        """A restarted tapd sets a restored lease's fence again: it is the
        kernel's state and normally still there, but nothing else may have
        been fenced in its absence, and part of it may be gone (a flushed
        nftables ruleset; a guest MAC another tap took while tapd was away).

        Unlike a grant's :meth:`_fence`, one step failing does not stop the
        others: the address filter is set even when the static FDB entry
        cannot be (the address look after the restart puts that back).  A
        tapd stopped between a fenced tap's join and its grant left it down;
        it comes up only if every step held."""
        failed = []
        for step, run in self._fence_steps(lease):
            try:
                await run()
            except TapdError as exc:
                failed.append(step)
                self.log.warning(
                    "lease.fence.failed", lease=lease.id, ifname=lease.ifname, step=step,
                    error=str(exc),
                )  # fmt: skip
            except Exception:
                failed.append(step)
                self.log.exception(
                    "lease.fence.failed", lease=lease.id, ifname=lease.ifname, step=step
                )
        if failed:
            return
        try:
            await self.worker.run(self.netlink.bring_up, lease.ifindex)
        except Exception:
            self.log.exception("lease.fence.failed", lease=lease.id, ifname=lease.ifname, step="up")
            return
        self.log.info("lease.fence.restored", lease=lease.id, fence=lease.fence)

    async def release(self, lease: Lease, reason: str = "released") -> None:
        """End a lease now: remove its tap even while a VM holds it; give a
        tap the client made back untouched (detached and untagged)."""
        if lease.adopted:
            await self._give_back(lease, reason)
            return
        # Its RTM_DELLINK ends the lease, with this reason.
        self._ending[lease.ifindex] = reason
        try:
            removed = await self.worker.run(self.netlink.delete, lease.ifindex)
        except BaseException:
            self._ending.pop(lease.ifindex, None)
            raise
        # Already gone and its event not yet here: end it now.
        if not removed:
            self._ending.pop(lease.ifindex, None)
            if self.registry.pop(lease.ifindex) is not None:
                self._ended(lease, reason)

    # -- restart ---------------------------------------------------------------

    async def reconcile(self) -> None:
        """Rebuild leases from the interfaces' tags, then look again.

        The listener runs already, but a tap removed (or gone idle) between
        the dump and its lease's registration was announced while tapd did
        not know it.  So every lease is registered first, with no await in
        between, and then :meth:`_resync` ends those whose tap is gone and
        applies the owner rule to those whose owner is gone: the end state
        is what it would be had tapd been running throughout.
        """
        restored = orphaned = 0
        for index, name, alias in await self.worker.run(self.netlink.tagged_taps):
            lease = parse_tag(index, name, alias)
            if lease is None:
                continue
            pidfd = owner.reopen(lease.pid, lease.starttime)
            if pidfd is not None:
                self.begin(lease, pidfd)
                if lease.fence:
                    await self._refence(lease)
                self.log.info("lease.restored", lease=lease.id, ifname=name, uid=lease.uid)
                restored += 1
                continue
            self.log.info("lease.owner.gone", lease=lease.id, ifname=name, pid=lease.pid)
            self.registry.add(lease)
            self._orphans.add(index)
            orphaned += 1
        await self._resync()
        # Shaping devices and address filters whose tap went while tapd was away.
        try:
            for index in await self.worker.run(self.netlink.orphan_ifbs):
                await self.worker.run(self.netlink.delete, index)
        except Exception:
            self.log.exception("lease.unshape.failed")
        await self._unfilter_orphans()
        self.log.info(
            "lease.reconciled", restored=restored, orphaned=orphaned, leases=len(self.registry)
        )
        self.reconciled.update(restored=restored, orphaned=orphaned)


def _tap_address(mac: str) -> bool:
    """Whether ``mac`` is an address tapd gives a tap (tapd.taps.random_mac)."""
    return mac.startswith(":".join(f"{b:02x}" for b in TAP_PREFIX) + ":")
