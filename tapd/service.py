"""What tapd does for each op, above the socket and above the kernel.

:class:`Service` turns a validated request (and any fds that came with it)
into a :class:`Grant`: the reply, the fds to send with it, and what to undo if
they cannot be delivered.  It speaks in intentions - judge as QEMU would,
check policy, make or adopt a tap, run the admin's script - and leaves bytes
to :mod:`tapd.server` and syscalls to :mod:`tapd.taps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from . import PROTOCOL_VERSION, __version__, programs
from .config import Config
from .errors import Denied, InvalidValue
from .models import REQUEST_MODELS, HelloReply, HelloRequest, TapReply, TapRequest
from .options import AdoptPlan, CreatePlan, HelperPlan, Vhost, plan
from .policy import Peer, check
from .taps import AdoptSpec, MadeTap, TapMaker, TapSpec, VhostSpec
from .tun import close_all
from .worker import KernelWorker


@dataclass
class Grant:
    """A reply ready to send.  After sending, :meth:`sent`; if it could not be
    delivered, :meth:`abandon` undoes what the request did."""

    reply: BaseModel
    fds: list[int] = field(default_factory=list)
    downscript: tuple[str, str, str] | None = None  # (name, path, ifname)
    hook_timeout: float = 10.0

    def sent(self) -> None:
        # Our copies go: once the VM closes its own, the tap is gone.
        close_all(self.fds)
        self.fds = []

    async def abandon(self, log: Any) -> None:
        if self.downscript is not None:
            name, path, ifname = self.downscript
            try:
                await programs.run_hook(name, path, ifname, self.hook_timeout)
            except Exception as exc:
                log.warning("hook.downscript.failed", script=name, error=str(exc))
        self.sent()


def _reply(made: MadeTap, fds: int) -> TapReply:
    return TapReply(
        ifname=made.ifname,
        bridge=made.bridge,
        fds=fds,
        vhostfds=len(made.vhost_fds),
        vnet_hdr=made.vnet_hdr,
        vnet_hdr_len=made.vnet_hdr_len,
        mac=made.mac,
        mtu=made.mtu,
        sndbuf=made.sndbuf,
        offloads=made.offloads,
        warnings=tuple(made.warnings),
    )


class Service:
    def __init__(self, config: Config, maker: TapMaker, worker: KernelWorker) -> None:
        self.config = config
        self.maker = maker
        self.worker = worker

    async def handle(
        self, peer: Peer, request: HelloRequest | TapRequest, fds_in: list[int], log: Any
    ) -> Grant:
        """Carry out ``request``.  ``fds_in`` stay the caller's to close."""
        if isinstance(request, HelloRequest):
            return Grant(
                HelloReply(
                    protocol=PROTOCOL_VERSION, version=__version__, ops=tuple(REQUEST_MODELS)
                )
            )
        what = plan(request)
        if isinstance(what, CreatePlan):
            return await self._create(peer, what, log)
        if isinstance(what, AdoptPlan):
            return await self._adopt(peer, what, fds_in, log)
        return await self._helper(peer, what, log)

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

    async def _create(self, peer: Peer, what: CreatePlan, log: Any) -> Grant:
        hooks = self.config.programs.hooks
        script = what.script and self._program("script", hooks, what.script)
        downscript = what.downscript and self._program("downscript", hooks, what.downscript)
        decision = check(self.config, peer, what.bridge, what.queues)
        log = log.bind(bridge=what.bridge, queues=what.queues, rule=decision.rule)
        spec = TapSpec(
            bridge=what.bridge,
            ifname=what.ifname,
            queues=what.queues,
            vnet_hdr=what.vnet_hdr,
            sndbuf=what.sndbuf,
            owner_uid=peer.uid,
            name_template=self.config.taps.name_template,
            vhost=self._vhost(what.vhost),
        )
        made = await self.worker.run(self.maker.make, spec)
        timeout = self.config.programs.hook_timeout
        if script and what.script:
            try:
                await programs.run_hook(what.script, script, made.ifname, timeout)
            except BaseException:
                made.close()
                raise
            log.info("hook.script.complete", script=what.script, ifname=made.ifname)
        log.info("request.granted", outcome="granted", ifname=made.ifname, mac=made.mac)
        return Grant(
            _reply(made, len(made.fds)),
            made.fds + made.vhost_fds,
            downscript=(what.downscript, downscript, made.ifname)
            if downscript and what.downscript
            else None,
            hook_timeout=timeout,
        )

    async def _adopt(self, peer: Peer, what: AdoptPlan, fds_in: list[int], log: Any) -> Grant:
        if len(fds_in) < len(what.names):
            raise InvalidValue(
                f"the request names {len(what.names)} tap fd(s) but {len(fds_in)} "
                "arrived with it; send them in SCM_RIGHTS with the request line"
            )
        decision = check(self.config, peer, what.bridge, len(what.names))
        log = log.bind(bridge=what.bridge, queues=len(what.names), rule=decision.rule)
        spec = AdoptSpec(
            bridge=what.bridge,
            fds=tuple(fds_in[: len(what.names)]),
            sndbuf=what.sndbuf,
            vhost=self._vhost(what.vhost),
        )
        made = await self.worker.run(self.maker.adopt, spec)
        log.info("request.granted", outcome="granted", ifname=made.ifname, adopted=True)
        # The client keeps its own tap fds; only vhost fds go back.
        return Grant(_reply(made, 0), list(made.vhost_fds))

    async def _helper(self, peer: Peer, what: HelperPlan, log: Any) -> Grant:
        path = self._program("helper", self.config.programs.helpers, what.helper)
        decision = check(self.config, peer, what.bridge, 1)
        log = log.bind(bridge=what.bridge, helper=what.helper, rule=decision.rule)
        fd = await programs.run_helper(
            what.helper, path, what.bridge, self.config.programs.helper_timeout
        )
        try:
            spec = AdoptSpec(
                bridge=what.bridge,
                fds=(fd,),
                sndbuf=what.sndbuf,
                owner_uid=peer.uid,
                vhost=self._vhost(what.vhost),
            )
            made = await self.worker.run(self.maker.adopt, spec)
        except BaseException:
            close_all([fd])
            raise
        log.info("request.granted", outcome="granted", ifname=made.ifname, mac=made.mac)
        return Grant(_reply(made, 1), [fd, *made.vhost_fds])
