"""What tapd does for each op, above the socket and above the kernel.

:class:`Service` turns a validated request (and any fds that came with it)
into a :class:`Grant`: the reply, the fds to send with it, and what to undo if
they cannot be delivered.  It speaks in intentions - judge as QEMU would,
check policy, make or adopt a tap, run the admin's script, start a lease - and
leaves bytes to :mod:`tapd.server` and syscalls to :mod:`tapd.taps`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

import trio
from pydantic import BaseModel

from . import PROTOCOL_VERSION, __version__, metrics, nft, programs
from .config import Config
from .errors import Denied, InvalidValue, LeaseNotFound, QuotaExceeded, TapdError
from .fence import Fence, check_guest_ips, choose_mac
from .leases import Lease, new_id
from .lifecycle import Lifecycle
from .models import (
    REQUEST_MODELS,
    BridgeHelperRequest,
    HelloReply,
    LeaseInfo,
    ListReply,
    MetricsReply,
    PrepareReply,
    PrepareRequest,
    ReleaseReply,
    Request,
    StatusReply,
    TapReply,
    TapRequest,
)
from .netlink import Bridge
from .options import (
    DEFAULT_HELPER_BRIDGE,
    AdoptPlan,
    CreatePlan,
    HelperPlan,
    Plan,
    Vhost,
    plan,
    prepare_plan,
)
from .owner import Owner, Peer
from .policy import Decision, Policy
from .taps import AdoptSpec, MadeTap, TapMaker, TapSpec, VhostSpec
from .tun import close_all
from .worker import KernelWorker


@dataclass
class Grant:
    """A reply ready to send.  After sending, :meth:`sent`; if it could not be
    delivered, :meth:`abandon` undoes what the request did."""

    reply: BaseModel
    fds: list[int] = field(default_factory=list)
    lease: Lease | None = None
    lifecycle: Lifecycle | None = None
    downscript_path: str | None = None
    hook_timeout: float = 10.0
    #: logs the grant: called once the reply is out, so that the client is
    #: not kept waiting for the log line (the lease is tracked before)
    on_sent: Callable[[], None] | None = None
    #: the allow rule that granted a tap (for the metrics)
    rule: str | None = None

    def sent(self) -> None:
        # Our copies go: once the VM closes its own, the tap is gone.
        close_all(self.fds)
        self.fds = []
        if self.on_sent is not None:
            self.on_sent()
            self.on_sent = None

    async def abandon(self, log: Any) -> None:
        if self.lease is not None and self.lifecycle is not None:
            await self.lifecycle.undo(self.lease)
            if self.downscript_path and self.lease.downscript:
                try:
                    await programs.run_hook(
                        self.lease.downscript,
                        self.downscript_path,
                        self.lease.ifname,
                        self.hook_timeout,
                    )
                except Exception as exc:
                    log.warning("hook.downscript.failed", lease=self.lease.id, error=str(exc))
        self.on_sent = None  # never delivered: request.undelivered says so
        self.sent()


def _reply(made: MadeTap, fds: int, lease: Lease) -> TapReply | PrepareReply:
    common: dict[str, Any] = {
        "lease": lease.id,
        "ifname": made.ifname,
        "bridge": made.bridge,
        "vnet_hdr": made.vnet_hdr,
        "mac": made.mac,
        "mtu": made.mtu,
        "warnings": tuple(made.warnings),
        "guest_mac": lease.guest_mac,
        "fence": _fence(lease),
        "guest_ips": lease.guest_ips or None,
    }
    if lease.prepared:
        return PrepareReply(queues=lease.queues, **common)
    return TapReply(
        fds=fds,
        vhostfds=len(made.vhost_fds),
        vnet_hdr_len=made.vnet_hdr_len,
        sndbuf=made.sndbuf,
        offloads=made.offloads,
        **common,
    )


def _fence(lease: Lease) -> dict[str, bool | int] | None:
    return Fence.from_tag(lease.fence).describe() if lease.fence else None


@dataclass(frozen=True)
class _Terms:
    """What a grant will be held to: the rule that decided, and the guest's
    MAC and addresses."""

    decision: Decision
    guest_mac: str
    guest_ips: tuple[str, ...]


class _Either:
    """``x in _Either(a, b)``: in either container, without building a union."""

    def __init__(self, *containers: Container[str]) -> None:
        self._containers = containers

    def __contains__(self, item: object) -> bool:
        return any(item in c for c in self._containers)


def _info(lease: Lease) -> LeaseInfo:
    return LeaseInfo.model_validate(lease.to_wire())


class Service:
    def __init__(
        self,
        config: Config,
        maker: TapMaker,
        worker: KernelWorker,
        lifecycle: Lifecycle,
        config_path: str | None = None,
    ) -> None:
        self.worker = worker
        self.maker = maker
        self.lifecycle = lifecycle
        self.config_path = config_path
        self.started = time.monotonic()
        self.connections = 0
        self.metrics = metrics.Recorder()
        # Taps being made right now, per uid: counted against max_taps with
        # the live leases, so that parallel requests cannot overshoot it.
        self._making: Counter[int] = Counter()
        self._reserved_macs: set[str] = set()
        self._reserved_ips: set[str] = set()
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        self.config = config
        self.policy = Policy(config)
        self.lifecycle.config = config

    async def handle(self, peer: Peer, request: Request, fds_in: list[int], log: Any) -> Grant:
        """Carry out ``request``.  ``fds_in`` stay the caller's to close."""
        if isinstance(request, TapRequest | PrepareRequest):
            # A prepared tap's lease belongs to its requester too: tapctl
            # prepare execs the VMM, so the VMM itself is the owner, and its
            # exit ends the tap.
            planner = plan if isinstance(request, TapRequest) else prepare_plan
            return await self._request(
                peer,
                planner(request, self.config.taps.ifname_prefix),
                fds_in,
                log,
                Owner.of_peer(peer),
                request.guest_mac,
                guest_ips=request.guest_ips,
            )
        if isinstance(request, BridgeHelperRequest):
            # QEMU's bridge helper protocol: a tap on br (default br0), no other
            # options; the lease belongs to the QEMU that ran the helper.
            options: dict[str, Any] = {"op": "request", "br": request.br or DEFAULT_HELPER_BRIDGE}
            if request.vnet_hdr is not None:
                options["vnet_hdr"] = request.vnet_hdr
            what = plan(TapRequest.model_validate(options))
            vmm = Owner.from_socket(fds_in[0], peer) if fds_in else Owner.parent_of(peer)
            # The helper protocol hands QEMU an fd and nothing else: QEMU's
            # NIC keeps the MAC its command line gave it.
            return await self._request(peer, what, [], log, vmm, mac_known=False)
        if request.op == "hello":
            return Grant(
                HelloReply(
                    protocol=PROTOCOL_VERSION, version=__version__, ops=tuple(REQUEST_MODELS)
                )
            )
        leases = self.lifecycle.registry
        if request.op == "list":
            return Grant(ListReply(leases=tuple(_info(x) for x in leases.visible_to(peer.uid))))
        if request.op == "status":
            return Grant(
                StatusReply(
                    version=__version__,
                    protocol=PROTOCOL_VERSION,
                    uptime=round(time.monotonic() - self.started, 3),
                    leases=len(leases.visible_to(peer.uid)),
                    connections=self.connections,
                    config=self.config_path,
                )
            )
        if request.op == "metrics":
            text = await metrics.scrape(
                self.metrics,
                peer,
                leases.visible_to(0),
                self.connections,
                self.lifecycle.reconciled,
            )
            return Grant(MetricsReply(text=text))
        assert request.op == "release"
        lease = leases.find(peer.uid, request.lease)
        if lease is None:
            raise LeaseNotFound(
                f"you hold no lease {request.lease!r}; see your leases with tapctl list"
            )
        await self.lifecycle.release(lease)
        log.info("lease.released", lease=lease.id, ifname=lease.ifname, owner=lease.uid)
        return Grant(ReleaseReply(lease=_info(lease)))

    # -- requests for taps ----------------------------------------------------

    async def _request(
        self,
        peer: Peer,
        what: Plan,
        fds_in: list[int],
        log: Any,
        owner_: Owner,
        guest_mac: str | None = None,
        mac_known: bool = True,
        guest_ips: list[str] | None = None,
    ) -> Grant:
        with owner_:
            try:
                return await self._granted(
                    peer, what, fds_in, log, owner_, guest_mac, mac_known, guest_ips
                )
            except TapdError as exc:
                exc.context = {"bridge": what.bridge, "queues": what.queues, **exc.context}
                raise

    async def _granted(
        self,
        peer: Peer,
        what: Plan,
        fds_in: list[int],
        log: Any,
        owner_: Owner,
        guest_mac: str | None,
        mac_known: bool,
        guest_ips: list[str] | None,
    ) -> Grant:
        log = log.bind(bridge=what.bridge, queues=what.queues)
        held = self.lifecycle.registry.held_by(peer.uid) + self._making[peer.uid]
        decision = self.policy.check(peer, what.bridge, what.queues, held)
        self._within_max_taps(peer)
        log = log.bind(rule=decision.rule)
        if decision.fence.mac_filtering and not mac_known:
            raise Denied(
                f"bridge {what.bridge!r} lets a guest send only with the MAC tapd gives it "
                f"({decision.rule} has mac_filtering), and QEMU's bridge helper protocol "
                "cannot tell QEMU that MAC; use tapctl request ... -device ...,mac={mac}"
            ).about(rule=decision.rule)
        # A MAC chosen but not yet leased is reserved, so that two requests in
        # flight never get the same one.
        registry = self.lifecycle.registry
        taken = _Either(registry.guest_macs, self._reserved_macs)
        mac = choose_mac(
            guest_mac,
            self.config.taps.guest_mac_prefix,
            taken,
            within_prefix=decision.fence.mac_filtering,
        )
        ips = check_guest_ips(
            guest_ips,
            decision.ip_ranges,
            decision.rule,
            _Either(registry.guest_ips, self._reserved_ips),
        )
        terms = _Terms(decision, mac, ips)
        self._reserved_macs.add(mac)
        self._reserved_ips.update(ips)
        self._making[peer.uid] += 1
        try:
            if isinstance(what, CreatePlan):
                grant = await self._create(peer, what, terms, owner_, log)
            elif isinstance(what, AdoptPlan):
                grant = await self._adopt(peer, what, terms, owner_, fds_in, log)
            else:
                grant = await self._helper(peer, what, terms, owner_, log)
            grant.rule = decision.rule
            return grant
        finally:
            self._reserved_macs.discard(mac)
            self._reserved_ips.difference_update(ips)
            self._making[peer.uid] -= 1
            if not self._making[peer.uid]:
                del self._making[peer.uid]

    def _within_max_taps(self, peer: Peer) -> None:
        """[taps] max_taps: live taps over every uid but root.  A rule's own
        max_taps is per uid, and a group rule matches every uid that keeps
        the group (subordinate uids in a user namespace do): only a total
        bounds what they can take together."""
        limit = self.config.taps.max_taps
        if limit is None or peer.uid == 0:
            return
        registry = self.lifecycle.registry
        total = len(registry) - registry.held_by(0) + sum(self._making.values())
        total -= self._making[0]
        if total >= limit:
            raise QuotaExceeded(
                f"tapd already serves {total} taps to users, the most it may "
                f"(taps.max_taps = {limit}); try again once some have ended"
            ).about(rule="taps.max_taps")

    def _program(self, kind: str, table: dict[str, str], name: str) -> str:
        path = table.get(name)
        if path is None:
            listed = ", ".join(sorted(table)) or "none"
            raise Denied(
                f"{kind} {name!r} is not one the administrator listed in tapd's "
                f"configuration (listed: {listed})"
            )
        return path

    def _vhost(self, vhost: Vhost) -> VhostSpec | None:
        if not vhost.provide:
            return None
        return VhostSpec(device=self.config.vhost.device, force=vhost.force)

    def _lease(
        self,
        peer: Peer,
        bridge: str,
        queues: int,
        owner_: Owner,
        downscript: str | None,
        terms: _Terms,
        adopted: bool = False,
        prepared: bool = False,
    ) -> Lease:
        """A lease with its tag, before the tap exists (the tag is set just
        before the tap joins its bridge)."""
        lease = Lease(
            id=new_id(),
            ifname="",
            ifindex=0,
            bridge=bridge,
            queues=queues,
            uid=peer.uid,
            gid=peer.gid,
            pid=owner_.pid,
            starttime=owner_.start,
            created=int(time.time()),
            downscript=downscript,
            adopted=adopted,
            prepared=prepared,
            guest_mac=terms.guest_mac,
            fence=terms.decision.fence.tag(),
            guest_ips=terms.guest_ips,
        )
        if not lease.fits():
            raise InvalidValue(
                "guest_ips: too many or too long addresses to record with the lease; name fewer"
            )
        return lease

    async def _grant(
        self,
        owner_: Owner,
        made: MadeTap,
        lease: Lease,
        fds: list[int],
        reply_fds: int,
        log: Any,
        downscript_path: str | None = None,
    ) -> Grant:
        lease = dataclasses.replace(lease, ifname=made.ifname, ifindex=made.ifindex)
        fence = Fence.from_tag(lease.fence)
        try:
            if lease.fence:
                # The port joined down (a disabled port: the bridge drops what
                # arrives on it) and comes up fenced.  Whoever may attach to
                # the tap already - an adopted tap's client, a prepared or
                # multi-queue tap's owner - never has a moment on an open port.
                await self.worker.run(self.maker.fence, made.ifindex, fence, lease.guest_mac)
                if fence.ip_filter:
                    await programs.run_nft(
                        self.config.programs.nft,
                        nft.lease_rules(lease.ifindex, lease.guest_mac, lease.guest_ips),
                    )
                await self.worker.run(self.maker.bring_up, made.ifindex)
            # Tracked before the reply goes out: the VM may close its fds (and
            # the kernel announce the tap's end) the moment it has them.
            self.lifecycle.begin(lease, owner_.take())
        except BaseException:
            close_all(fds)  # the tap fds we made (an adopted tap's stay the client's)
            await self._unfence(lease, fence, log)
            if lease.prepared:
                await self._discard(made, persistent=True)
            raise

        def granted() -> None:
            log.info(
                "request.granted",
                outcome="granted",
                lease=lease.id,
                ifname=made.ifname,
                mac=made.mac,
                guest_mac=lease.guest_mac,
                fence=lease.fence or None,
                warnings=made.warnings or None,
            )

        return Grant(
            _reply(made, reply_fds, lease),
            fds,
            lease=lease,
            lifecycle=self.lifecycle,
            downscript_path=downscript_path,
            hook_timeout=self.config.programs.hook_timeout,
            on_sent=granted,
        )

    async def _create(
        self,
        peer: Peer,
        what: CreatePlan,
        terms: _Terms,
        owner_: Owner,
        log: Any,
    ) -> Grant:
        decision = terms.decision
        if (
            what.persistent
            and peer.uid != 0
            and decision.tap_gid is not None
            and decision.tap_gid not in peer.all_gids()
        ):
            # tun_not_capable() (drivers/net/tun.c) lets a process attach only
            # if it is the owner and in the group: the VMM could not open it.
            raise Denied(
                f"{decision.rule} gives its taps to group {decision.tap_gid} (tap_group), "
                f"which uid {peer.uid} is not in: the kernel would let only root open a "
                "prepared tap with that group; ask the administrator"
            ).about(rule=decision.rule)
        hooks = self.config.programs.hooks
        script = what.script and self._program("script", hooks, what.script)
        downscript = what.downscript and self._program("downscript", hooks, what.downscript)
        lease = self._lease(
            peer,
            what.bridge,
            what.queues,
            owner_,
            what.downscript,
            terms,
            prepared=what.persistent,
        )
        spec = TapSpec(
            bridge=what.bridge,
            ifname=what.ifname,
            queues=what.queues,
            vnet_hdr=what.vnet_hdr,
            sndbuf=what.sndbuf,
            owner_uid=peer.uid,
            owner_gid=decision.tap_gid,
            name_template=self.config.taps.name_template,
            vhost=self._vhost(what.vhost),
            alias=lease.tag(),
            up=not decision.fence.wanted,
        )
        if what.persistent:
            # Worker: besides joining, the last close of tapd's queue waits
            # for an RCU grace period.
            made = await self.worker.run(self.maker.prepare, spec, await self._bridge(spec.bridge))
        else:
            made = await self._make(spec)
        if script and what.script:
            try:
                await programs.run_hook(
                    what.script, script, made.ifname, self.config.programs.hook_timeout
                )
            except BaseException:
                await self._discard(made, persistent=what.persistent)
                raise
            log.info("hook.script.complete", script=what.script, ifname=made.ifname)
        return await self._grant(
            owner_, made, lease, made.fds + made.vhost_fds, len(made.fds), log, downscript or None
        )

    async def _make(self, spec: TapSpec) -> MadeTap:
        """Make the tap ``spec`` asks for, on the loop when that is cheap.

        A single-queue tap is a few syscalls (~0.5 ms, nearly all of it the
        kernel's), and the hop to the worker and back cost 0.4 ms more (two
        thread wake-ups and the GIL changing hands each way), so the loop
        makes it itself - unless the worker is busy (its removals hold RTNL
        for milliseconds, and the loop would wait for them) or the tap has
        many queues (a 256-queue tap is ~1,000 RTNL round trips).  Removing a
        tap that failed half-way is also slow (the last close of a queue
        waits for an RCU grace period), so that goes to the worker too.
        """
        bridge = await self._bridge(spec.bridge)
        if spec.queues > 1 or self.worker.busy:
            return await self.worker.run(self.maker.make, spec, bridge)
        made = self.maker.create(spec, bridge)
        try:
            self.maker.attach(made, bridge, spec)
        except BaseException:
            await self._discard(made)
            raise
        return made

    async def _bridge(self, name: str) -> Bridge:
        bridge = self.maker.cached_bridge(name)
        if bridge is None:
            bridge = await self.worker.run(self.maker.bridge, name)
        return bridge

    async def _unfence(self, lease: Lease, fence: Fence, log: Any) -> None:
        """Undo what :meth:`_grant` set up for a lease it could not start: an
        adopted tap off the bridge, no ifb, no address filter.  Each step is
        tried; the error that got here is the one the client sees.  A tap
        another request leased meanwhile (two adoptions of one tap) is left
        to that lease."""
        if self.lifecycle.registry.get(lease.ifindex) is not None:
            return
        with trio.CancelScope(shield=True):
            try:
                await self.worker.run(self.maker.unfence, lease.ifindex, fence, lease.adopted)
            except Exception as exc:
                log.warning("lease.unfence.failed", ifname=lease.ifname, error=str(exc))
            if fence.ip_filter:
                # Most likely never loaded if this fails; reconcile drops orphans.
                with contextlib.suppress(Exception):
                    await programs.run_nft(
                        self.config.programs.nft, nft.remove_lease(lease.ifindex)
                    )

    async def _discard(self, made: MadeTap, persistent: bool = False) -> None:
        """Remove a tap that will not be granted, off the loop: the last
        close of a queue waits for an RCU grace period, and a persistent tap
        outlives its fds."""
        with trio.CancelScope(shield=True):
            if persistent:
                await self.worker.run(self.maker.remove, made.ifindex)
            else:
                await self.worker.run(made.close)

    async def _adopt(
        self,
        peer: Peer,
        what: AdoptPlan,
        terms: _Terms,
        owner_: Owner,
        fds_in: list[int],
        log: Any,
    ) -> Grant:
        if len(fds_in) < len(what.names):
            raise InvalidValue(
                f"the request names {len(what.names)} tap fd(s) but {len(fds_in)} "
                "arrived with it; send them in SCM_RIGHTS with the request line"
            )
        lease = self._lease(peer, what.bridge, what.queues, owner_, None, terms, adopted=True)
        spec = AdoptSpec(
            bridge=what.bridge,
            fds=tuple(fds_in[: len(what.names)]),
            sndbuf=what.sndbuf,
            vhost=self._vhost(what.vhost),
            alias=lease.tag(),
            require_owner=None if peer.uid == 0 else peer.uid,
            leased=self.lifecycle.registry.indexes(),
            up=not terms.decision.fence.wanted,
        )
        made = await self.worker.run(self.maker.adopt, spec)
        # The client keeps its own tap fds; only vhost fds go back.
        return await self._grant(owner_, made, lease, list(made.vhost_fds), 0, log)

    async def _helper(
        self,
        peer: Peer,
        what: HelperPlan,
        terms: _Terms,
        owner_: Owner,
        log: Any,
    ) -> Grant:
        decision = terms.decision
        path = self._program("helper", self.config.programs.helpers, what.helper)
        lease = self._lease(peer, what.bridge, 1, owner_, None, terms)
        fd = await programs.run_helper(
            what.helper, path, what.bridge, self.config.programs.helper_timeout
        )
        try:
            spec = AdoptSpec(
                bridge=what.bridge,
                fds=(fd,),
                sndbuf=what.sndbuf,
                owner_uid=peer.uid,
                owner_gid=decision.tap_gid,
                vhost=self._vhost(what.vhost),
                alias=lease.tag(),
                leased=self.lifecycle.registry.indexes(),
                up=not decision.fence.wanted,
            )
            made = await self.worker.run(self.maker.adopt, spec)
        except BaseException:
            close_all([fd])
            raise
        return await self._grant(owner_, made, lease, [fd, *made.vhost_fds], 1, log)
