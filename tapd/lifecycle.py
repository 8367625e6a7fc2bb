"""Leases from grant to the tap's end: netlink events, owner processes, restarts.

A lease ends when its tap goes away, which tapd learns from RTM_DELLINK, never
by polling.  A VM may make its tap persistent (TUNSETPERSIST needs no privilege
on an fd it holds), so tapd also watches each lease's owner process through a
pidfd and removes the tap once the owner is gone.  At start, :meth:`reconcile`
rebuilds the leases from the tags on the interfaces themselves.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from typing import Any

import trio

from . import log as logging
from . import nft, owner, programs
from .config import Config
from .errors import Denied
from .fence import Fence
from .leases import Lease, Registry, parse_tag
from .netlink import Netlink, link_events
from .worker import KernelWorker


class Lifecycle:
    def __init__(self, config: Config, worker: KernelWorker, netlink: Netlink) -> None:
        self.config = config
        self.worker = worker
        self.netlink = netlink
        self.registry = Registry()
        self.log = logging.get()
        self._watches: dict[int, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        #: what reconcile() found, for the metrics: restored, removed, forgotten
        self.reconciled: Counter[str] = Counter()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # Listening before reconciling: no removal between the two is missed.
            await nursery.start(link_events, self._link_gone)
            await self.reconcile()
            task_status.started()

    # -- events ----------------------------------------------------------------

    def _link_gone(self, index: int | None) -> None:
        if index is None:
            self._spawn(self._resync)
            return
        lease = self.registry.pop(index)
        if lease is not None:
            self._ended(lease, "tap-removed")

    async def _resync(self) -> None:
        try:
            present = await self.worker.run(self.netlink.present)
        except Exception:
            self.log.exception("lease.resync.failed")
            return
        for lease in self.registry.visible_to(0):
            if lease.ifindex not in present and self.registry.pop(lease.ifindex):
                self._ended(lease, "tap-removed")

    def _ended(self, lease: Lease, reason: str) -> None:
        scope = self._watches.pop(lease.ifindex, None)
        if scope is not None:
            scope.cancel()
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

    # -- grants ----------------------------------------------------------------

    def begin(self, lease: Lease, pidfd: int) -> None:
        """Start tracking ``lease``; takes ownership of ``pidfd``.  An
        interface has at most one lease: a second is refused."""
        if self.registry.get(lease.ifindex) is not None:
            os.close(pidfd)
            raise Denied(f"tap {lease.ifname!r} already has a lease")
        self.registry.add(lease)
        scope = trio.CancelScope()
        self._watches[lease.ifindex] = scope
        # No log event here: request.granted (or lease.restored) names the lease.
        self._spawn(self._watch, lease, pidfd, scope)

    async def undo(self, lease: Lease) -> None:
        """A grant was never delivered: forget its lease and remove the tap
        tapd made for it (an adopted one leaves the bridge), with its ifb and
        address filter.  Closing tapd's own fds is not enough: a client that
        received part of a split reply holds queues, and could make them
        persistent."""
        if self.registry.get(lease.ifindex) is not lease:
            return
        self.registry.pop(lease.ifindex)
        scope = self._watches.pop(lease.ifindex, None)
        if scope is not None:
            scope.cancel()
        try:
            if lease.adopted:
                # Still the client's tap: off the bridge, untagged, as it came.
                await self.worker.run(self.netlink.leave_bridge, lease.ifindex)
            else:
                await self.worker.run(self.netlink.delete, lease.ifindex)
        except Exception:
            self.log.exception("lease.remove.failed", lease=lease.id)
        # The lease was forgotten before its tap went, so _ended() never sees
        # it: what its fence made beside the tap goes here.
        fence = Fence.from_tag(lease.fence)
        if fence.shaped:
            await self._unshape(lease, tap_too=lease.adopted)
        if fence.ip_filter:
            await self._unfilter(lease.ifindex)

    async def _watch(self, lease: Lease, pidfd: int, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await trio.lowlevel.wait_readable(pidfd)
                if self.registry.get(lease.ifindex) is not lease:
                    return
                self.log.info(
                    "lease.owner.exited", lease=lease.id, ifname=lease.ifname, pid=lease.pid
                )
                if lease.adopted:
                    # The client made this tap: tapd forgets its lease, and
                    # leaves the tap to the fds that keep it - untagged, so
                    # that a restarted tapd does not take it for a lease, and
                    # off a bridge its rule fences.
                    self.registry.pop(lease.ifindex)
                    self._ended(lease, "owner-exited")
                    await self._untag(lease)
                    return
                # Usually the owner's exit closed the fds and the tap is already
                # going; a persistent tap is removed here.  Either way the
                # RTM_DELLINK that follows ends the lease - unless the event
                # was lost and the tap is already gone: then end it here.
                try:
                    removed = await self.worker.run(self.netlink.delete, lease.ifindex)
                except Exception:
                    self.log.exception("lease.remove.failed", lease=lease.id)
                    return
                if not removed and self.registry.get(lease.ifindex) is lease:
                    self.registry.pop(lease.ifindex)
                    self._ended(lease, "tap-removed")
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)

    async def _untag(self, lease: Lease) -> None:
        try:
            if lease.fence:
                # Whoever still holds the client's tap must not keep a port of
                # a bridge its rule fences without that fence: the tap leaves
                # the bridge, down and untagged, as it came (its port flags
                # and static FDB entry go with the port; its filter and ifb
                # with the lease, in _ended()).
                await self.worker.run(self.netlink.leave_bridge, lease.ifindex)
                if Fence.from_tag(lease.fence).shaped:
                    await self.worker.run(self.netlink.unshape, lease.ifindex, True)
            else:
                await self.worker.run(self.netlink.clear_tag, lease.ifindex)
        except Exception:
            self.log.exception("lease.untag.failed", lease=lease.id)

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

    async def _unfilter_orphans(self) -> None:
        path = self.config.programs.nft
        if not os.access(path, os.X_OK):
            return  # no nft here: no rule filters addresses, and none can be left
        listing = await programs.list_nft_table(path, "bridge", nft.TABLE)
        leased = {lease.ifindex for lease in self.registry.visible_to(0)}
        for ifindex in nft.leased_indexes(listing or {}):
            if ifindex not in leased:
                await self._unfilter(ifindex)

    async def _refence(self, lease: Lease) -> None:
        """A restarted tapd sets a restored lease's port flags again: they are
        the kernel's state and normally still there, but nothing else may have
        been fenced in their absence."""
        fence = Fence.from_tag(lease.fence)
        mac = lease.guest_mac if fence.mac_filtering else None
        try:
            await self.worker.run(self.netlink.set_port, lease.ifindex, fence.port_flags(), mac)
            if fence.shaped:
                await self.worker.run(
                    self.netlink.shape, lease.ifindex, fence.ingress, fence.egress
                )
            if fence.ip_filter:
                document = nft.lease_rules(lease.ifindex, lease.guest_mac, lease.guest_ips)
                await programs.run_nft(self.config.programs.nft, document)
            # A tapd stopped between a fenced tap's join and its grant left it
            # down (tapd.netlink.Netlink.bring_up); fenced again, it may come up.
            await self.worker.run(self.netlink.bring_up, lease.ifindex)
        except Exception:
            self.log.exception("lease.fence.failed", lease=lease.id)
        else:
            self.log.info("lease.fence.restored", lease=lease.id, fence=lease.fence)

    async def release(self, lease: Lease) -> None:
        """End a lease now: remove its tap even while a VM holds it."""
        removed = await self.worker.run(self.netlink.delete, lease.ifindex)
        # Already gone and its event not yet here: end it now.
        if not removed and self.registry.pop(lease.ifindex) is not None:
            self._ended(lease, "released")

    # -- restart ---------------------------------------------------------------

    async def reconcile(self) -> None:
        """Rebuild leases from the interfaces' tags; remove taps whose owner is gone."""
        kept = removed = forgotten = 0
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
                kept += 1
                continue
            self.log.info("lease.owner.gone", lease=lease.id, ifname=name, pid=lease.pid)
            if lease.adopted:
                # Not tapd's tap: forgotten, as when its owner exits while
                # tapd runs, never removed.
                await self._untag(lease)
                forgotten += 1
                continue
            self.registry.add(lease)  # so that its RTM_DELLINK ends it, downscript and all
            with contextlib.suppress(Exception):
                await self.worker.run(self.netlink.delete, index)
            removed += 1
        # Shaping devices and address filters whose tap went while tapd was away.
        try:
            for index in await self.worker.run(self.netlink.orphan_ifbs):
                await self.worker.run(self.netlink.delete, index)
        except Exception:
            self.log.exception("lease.unshape.failed")
        await self._unfilter_orphans()
        self.log.info("lease.reconciled", kept=kept, removed=removed, forgotten=forgotten)
        self.reconciled.update(restored=kept, removed=removed, forgotten=forgotten)
