"""What tapd does for each op: the op table, above the socket and the kernel.

:class:`Service` maps each validated request (and any fds that came with it)
to a :class:`~tapd.lifecycle.Grant`: the reply, and for a tap the fds to send
with it and the lease they start.  Requests for taps are worked out into a
plan as QEMU would (:mod:`tapd.options`), their owner found
(:class:`tapd.owner.Owner`) and handed to :class:`tapd.grants.Granter`; bytes
are :mod:`tapd.server`'s.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import PROTOCOL_VERSION, __version__, metrics
from .config import Config
from .errors import LeaseNotFound
from .grants import Granter
from .leases import Lease
from .lifecycle import Grant, Lifecycle
from .log import Logger
from .making import TapMaker
from .models import (
    REQUEST_MODELS,
    BridgeHelperRequest,
    HelloReply,
    LeaseInfo,
    ListReply,
    MetricsReply,
    PrepareRequest,
    ReleaseReply,
    ReleaseRequest,
    Request,
    StatusReply,
    TapRequest,
)
from .options import DEFAULT_HELPER_BRIDGE, plan, prepare_plan
from .owner import Owner, Peer

#: what an op does: (peer, request, fds that came with it, log) -> the reply
Op = Callable[[Peer, Any, list[int], Logger], Awaitable[Grant]]


def _info(lease: Lease) -> LeaseInfo:
    return LeaseInfo.model_validate(lease.to_wire())


class Service:
    def __init__(
        self,
        config: Config,
        maker: TapMaker,
        lifecycle: Lifecycle,
        config_path: str | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.granter = Granter(config, maker, lifecycle)
        self.config_path = config_path
        self.started = time.monotonic()
        self.connections = 0
        self.metrics = metrics.Recorder()
        self._ops: dict[str, Op] = {
            "hello": self._hello,
            "request": self._tap,
            "prepare": self._tap,
            "bridge-helper": self._bridge_helper,
            "list": self._list,
            "status": self._status,
            "metrics": self._metrics,
            "release": self._release,
        }
        assert set(self._ops) == set(REQUEST_MODELS), "every op the wire knows has its entry"
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        self.config = config
        self.granter.configure(config)
        self.lifecycle.config = config

    async def handle(self, peer: Peer, request: Request, fds_in: list[int], log: Logger) -> Grant:
        """Carry out ``request``.  ``fds_in`` stay the caller's to close."""
        return await self._ops[request.op](peer, request, fds_in, log)

    # -- taps ---------------------------------------------------------------------

    async def _tap(
        self, peer: Peer, request: TapRequest | PrepareRequest, fds_in: list[int], log: Logger
    ) -> Grant:
        # A prepared tap's lease belongs to its requester too: tapctl prepare
        # execs the VMM, so the VMM itself is the owner, and its exit ends
        # the tap.
        planner = plan if isinstance(request, TapRequest) else prepare_plan
        what = planner(request, self.config.taps.ifname_prefix)
        with Owner.of_peer(peer) as owner_:
            return await self.granter.grant(
                peer,
                what,
                fds_in,
                log,
                owner_,
                request.guest_mac,
                guest_ips=request.guest_ips,
                vlan=request.vlan,
            )

    async def _bridge_helper(
        self, peer: Peer, request: BridgeHelperRequest, fds_in: list[int], log: Logger
    ) -> Grant:
        # QEMU's bridge helper protocol: a tap on br (default br0), no other
        # options; the lease belongs to the QEMU that ran the helper.
        options: dict[str, Any] = {"op": "request", "br": request.br or DEFAULT_HELPER_BRIDGE}
        if request.vnet_hdr is not None:
            options["vnet_hdr"] = request.vnet_hdr
        what = plan(TapRequest.model_validate(options))
        vmm = Owner.from_socket(fds_in[0], peer) if fds_in else Owner.parent_of(peer)
        with vmm:
            # The helper protocol hands QEMU an fd and nothing else: QEMU's
            # NIC keeps the MAC its command line gave it.
            return await self.granter.grant(peer, what, [], log, vmm, mac_known=False)

    # -- everything else --------------------------------------------------------

    async def _hello(self, peer: Peer, request: Request, fds_in: list[int], log: Logger) -> Grant:
        return Grant(
            HelloReply(protocol=PROTOCOL_VERSION, version=__version__, ops=tuple(REQUEST_MODELS))
        )

    async def _list(self, peer: Peer, request: Request, fds_in: list[int], log: Logger) -> Grant:
        leases = self.lifecycle.registry.visible_to(peer.uid)
        return Grant(ListReply(leases=tuple(_info(x) for x in leases)))

    async def _status(self, peer: Peer, request: Request, fds_in: list[int], log: Logger) -> Grant:
        return Grant(
            StatusReply(
                version=__version__,
                protocol=PROTOCOL_VERSION,
                uptime=round(time.monotonic() - self.started, 3),
                leases=len(self.lifecycle.registry.visible_to(peer.uid)),
                connections=self.connections,
                config=self.config_path,
            )
        )

    async def _metrics(self, peer: Peer, request: Request, fds_in: list[int], log: Logger) -> Grant:
        text = await metrics.scrape(
            self.metrics,
            peer,
            self.lifecycle.registry.visible_to(0),
            self.connections,
            self.lifecycle.reconciled,
        )
        return Grant(MetricsReply(text=text))

    async def _release(
        self, peer: Peer, request: ReleaseRequest, fds_in: list[int], log: Logger
    ) -> Grant:
        lease = self.lifecycle.registry.find(peer.uid, request.lease)
        if lease is None:
            raise LeaseNotFound(
                f"you hold no lease {request.lease!r}; see your leases with tapctl list"
            )
        await self.lifecycle.release(lease)
        log.info("lease.released", lease=lease.id, ifname=lease.ifname, owner=lease.uid)
        return Grant(ReleaseReply(lease=_info(lease)))
