"""Granting a tap: from a plan QEMU would accept to a reply with its fds.

:class:`Granter` holds a request to the admin's policy and tapd's own limits,
gives the guest its MAC and addresses, has the tap made (or adopted) through
a :class:`tapd.making.TapMaker`, runs the admin's script, and starts the
lease through the :class:`tapd.lifecycle.Lifecycle`, which then owns it:
delivery, undo and the tap's end are the lifecycle's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Container, Iterator
from dataclasses import dataclass
from typing import Any

from . import programs
from .config import Config
from .errors import CoolingOff, Denied, InvalidValue, QuotaExceeded, TapdError, VlanFilteringOff
from .fence import Fence, check_guest_ips, check_not_the_hosts, choose_mac, choose_vlan
from .leases import Lease, LeaseTerms, new_id, vlans_to_wire
from .lifecycle import Grant, Lifecycle
from .log import Logger
from .making import TapMaker
from .models import PrepareReply, TapReply
from .options import AdoptPlan, CreatePlan, HelperPlan, Plan, Vhost
from .owner import Owner, Peer
from .policy import Decision, Policy
from .taps import AdoptSpec, MadeTap, TapSpec, VhostSpec
from .tun import close_all


@dataclass(frozen=True)
class _Terms:
    """What a grant will be held to: the rule that decided, the guest's MAC
    and addresses, and the port's fence (the rule's, in the chosen VLAN)."""

    decision: Decision
    guest_mac: str
    guest_ips: tuple[str, ...]
    fence: Fence


class _Either:
    """``x in _Either(a, b)``: in either container, without building a union."""

    def __init__(self, *containers: Container[str]) -> None:
        self._containers = containers

    def __contains__(self, item: object) -> bool:
        return any(item in c for c in self._containers)


def _reply(made: MadeTap, fds: int, lease: Lease) -> TapReply | PrepareReply:
    """The reply for ``lease``, derived from the tap as made."""
    common: dict[str, Any] = {
        "lease": lease.id,
        "ifname": made.ifname,
        "bridge": made.bridge,
        "vnet_hdr": made.vnet_hdr,
        "mac": made.mac,
        "mtu": made.mtu,
        "warnings": tuple(made.warnings),
        "guest_mac": lease.guest_mac,
        "fence": Fence.from_tag(lease.fence).on_wire(),
        "guest_ips": lease.guest_ips or None,
        **vlans_to_wire(lease.fence),
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


class Granter:
    def __init__(self, config: Config, maker: TapMaker, lifecycle: Lifecycle) -> None:
        self.maker = maker
        self.lifecycle = lifecycle
        # Taps being made right now, per uid: counted against max_taps with
        # the live leases, so that parallel requests cannot overshoot it.
        self._making: Counter[int] = Counter()
        self._reserved_macs: set[str] = set()
        self._reserved_ips: set[str] = set()
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.config = config
        self.policy = Policy(config)

    async def grant(
        self,
        peer: Peer,
        what: Plan,
        fds_in: list[int],
        log: Logger,
        owner_: Owner,
        guest_mac: str | None = None,
        mac_known: bool = True,
        guest_ips: list[str] | None = None,
        vlan: int | None = None,
    ) -> Grant:
        """A tap for ``peer`` as ``what`` says, leased to ``owner_`` (whose
        pidfd the lease takes; the caller closes ``owner_`` either way).
        ``fds_in`` stay the caller's to close.  ``vlan``: the access VLAN
        asked for (None: the rule's default, if it has VLANs)."""
        log = log.bind(bridge=what.bridge, queues=what.queues)
        try:
            held = self.lifecycle.registry.held_by(peer.uid) + self._making[peer.uid]
            decision = self.policy.check(peer, what.bridge, what.queues, held)
            self._within_max_taps(peer)
            left = self.lifecycle.cooling_off(peer.uid, what.bridge)
            if left is not None:
                raise CoolingOff(
                    f"a tap of uid {peer.uid} on bridge {what.bridge!r} was taken from it "
                    "for changing its address again and again (to addresses not its "
                    f"own); uid {peer.uid} gets no tap there for another {left:.0f} s"
                ).about(rule=decision.rule, seconds=round(left))
            log = log.bind(rule=decision.rule)
            if decision.fence.mac_filtering and not mac_known:
                raise Denied(
                    f"bridge {what.bridge!r} lets a guest send only with the MAC tapd gives it "
                    f"({decision.rule} has mac_filtering), and QEMU's bridge helper protocol "
                    "cannot tell QEMU that MAC; use tapctl request ... -device ...,mac={mac}"
                ).about(rule=decision.rule)
            fence = dataclasses.replace(
                decision.fence, vlan=choose_vlan(vlan, decision.vlans, decision.rule)
            )
            if fence.vlans:
                await self._check_vlan_filtering(what.bridge, decision.rule)
            # Before the checks and the reservation below, between which
            # nothing may wait: another request could take the same address.
            host = None
            if decision.ip_ranges and guest_ips:
                host = await self.lifecycle.worker.run(
                    self.lifecycle.netlink.host_addresses, what.bridge
                )
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
            if host is not None:
                check_not_the_hosts(ips, host, what.bridge)
            terms = _Terms(decision, mac, ips, fence)
            with self._reserved(peer.uid, mac, ips):
                if isinstance(what, CreatePlan):
                    grant = await self._create(peer, what, terms, owner_, log)
                elif isinstance(what, AdoptPlan):
                    grant = await self._adopt(peer, what, terms, owner_, fds_in, log)
                else:
                    grant = await self._helper(peer, what, terms, owner_, log)
            grant.rule = decision.rule
            return grant
        except TapdError as exc:
            # Every refusal says, in the audit log, what was asked for.
            exc.about(bridge=what.bridge, queues=what.queues)
            raise

    async def _check_vlan_filtering(self, bridge: str, rule: str) -> None:
        """A rule with VLANs needs a bridge that filters them: on any other
        the port's VLANs would be kept but never applied, and its guest
        would reach every VLAN.  tapd never turns filtering on itself (it
        changes what every port of the bridge may reach)."""
        netlink = self.lifecycle.netlink
        if not await self.lifecycle.worker.run(netlink.vlan_filtering, bridge):
            raise VlanFilteringOff(
                f"{rule} puts its taps in VLANs, and bridge {bridge!r} does not filter "
                f"VLANs; the administrator turns it on with: ip link set {bridge} type "
                "bridge vlan_filtering 1 (tapd never does)"
            ).about(rule=rule)

    @contextlib.contextmanager
    def _reserved(self, uid: int, mac: str, ips: tuple[str, ...]) -> Iterator[None]:
        """While a tap is being made: its guest MAC and addresses are taken
        (two requests in flight never get the same), and it counts against
        its uid's quota and max_taps with the live leases."""
        self._reserved_macs.add(mac)
        self._reserved_ips.update(ips)
        self._making[uid] += 1
        try:
            yield
        finally:
            self._reserved_macs.discard(mac)
            self._reserved_ips.difference_update(ips)
            self._making[uid] -= 1
            if not self._making[uid]:
                del self._making[uid]

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

    def _terms(
        self,
        peer: Peer,
        bridge: str,
        queues: int,
        owner_: Owner,
        downscript: str | None,
        terms: _Terms,
        adopted: bool = False,
        prepared: bool = False,
    ) -> LeaseTerms:
        """The lease's terms, before the tap exists: its tag goes on the tap
        just before the tap joins its bridge."""
        lease = LeaseTerms(
            id=new_id(),
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
            fence=terms.fence.tag(),
            guest_ips=terms.guest_ips,
        )
        if not lease.fits():
            if not terms.guest_ips:
                # A trunk's VLANs are the only other field of any length.
                raise InvalidValue(
                    f"{terms.decision.rule}'s vlan_tagged and this request's downscript are "
                    "too long together to record with the lease on the tap; ask the "
                    "administrator for fewer runs of VLANs"
                ).about(rule=terms.decision.rule)
            raise InvalidValue(
                "guest_ips: too many or too long addresses to record with the lease; name fewer"
            )
        return lease

    async def _grant(
        self,
        owner_: Owner,
        made: MadeTap,
        terms: LeaseTerms,
        fds: list[int],
        reply_fds: int,
        log: Logger,
    ) -> Grant:
        """Start the lease on the tap as made, and the reply that hands it
        out.  On failure the tap goes (an adopted tap stays its client's)."""
        lease = terms.on(made.ifname, made.ifindex)
        try:
            await self.lifecycle.start(lease, owner_)
        except BaseException:
            close_all(fds)  # the tap fds we made (an adopted tap's stay the client's)
            if lease.prepared:
                await self.maker.discard(made, persistent=True)
            raise

        def granted() -> None:
            log.info(
                "request.granted",
                outcome="granted",
                lease=lease.id,
                ifname=made.ifname,
                mac=made.mac,
                guest_mac=lease.guest_mac,
                guest_ips=list(lease.guest_ips) or None,
                fence=Fence.from_tag(lease.fence).on_wire(),
                **{k: v for k, v in vlans_to_wire(lease.fence).items() if v is not None},
                warnings=made.warnings or None,
            )

        return Grant(
            _reply(made, reply_fds, lease),
            fds,
            lease=lease,
            lifecycle=self.lifecycle,
            on_sent=granted,
        )

    async def _create(
        self,
        peer: Peer,
        what: CreatePlan,
        terms: _Terms,
        owner_: Owner,
        log: Logger,
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
        if what.downscript:
            self._program("downscript", hooks, what.downscript)
        lease = self._terms(
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
            up=not terms.fence.wanted,
        )
        if what.persistent:
            made = await self.maker.prepare(spec)
        else:
            made = await self.maker.make(spec)
        if script and what.script:
            try:
                await programs.run_hook(
                    what.script, script, made.ifname, self.config.programs.hook_timeout
                )
            except BaseException:
                await self.maker.discard(made, persistent=what.persistent)
                raise
            log.info("hook.script.complete", script=what.script, ifname=made.ifname)
        return await self._grant(owner_, made, lease, made.fds + made.vhost_fds, len(made.fds), log)

    async def _adopt(
        self,
        peer: Peer,
        what: AdoptPlan,
        terms: _Terms,
        owner_: Owner,
        fds_in: list[int],
        log: Logger,
    ) -> Grant:
        if len(fds_in) < len(what.names):
            raise InvalidValue(
                f"the request names {len(what.names)} tap fd(s) but {len(fds_in)} "
                "arrived with it; send them in SCM_RIGHTS with the request line"
            )
        lease = self._terms(peer, what.bridge, what.queues, owner_, None, terms, adopted=True)
        spec = AdoptSpec(
            bridge=what.bridge,
            fds=tuple(fds_in[: len(what.names)]),
            sndbuf=what.sndbuf,
            vhost=self._vhost(what.vhost),
            alias=lease.tag(),
            require_owner=None if peer.uid == 0 else peer.uid,
            leased=self.lifecycle.registry.indexes(),
            up=not terms.fence.wanted,
        )
        made = await self.maker.adopt(spec)
        # The client keeps its own tap fds; only vhost fds go back.
        return await self._grant(owner_, made, lease, list(made.vhost_fds), 0, log)

    async def _helper(
        self,
        peer: Peer,
        what: HelperPlan,
        terms: _Terms,
        owner_: Owner,
        log: Logger,
    ) -> Grant:
        decision = terms.decision
        path = self._program("helper", self.config.programs.helpers, what.helper)
        lease = self._terms(peer, what.bridge, 1, owner_, None, terms)
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
                up=not terms.fence.wanted,
            )
            made = await self.maker.adopt(spec)
        except BaseException:
            close_all([fd])
            raise
        return await self._grant(owner_, made, lease, [fd, *made.vhost_fds], 1, log)
