"""Making taps ready for a VM: the steps tapd carries out in the kernel.

:class:`KernelTaps` strings :mod:`tapd.tun` and :mod:`tapd.netlink` together,
synchronously: create a tap's queues, prepare them as QEMU would and put the
tap on its bridge; make a persistent one; check and adopt one made elsewhere.
Which thread runs each step is :mod:`tapd.making`'s choice; code above that
only sees its awaitable :class:`tapd.making.TapMaker`.
"""

from __future__ import annotations

import errno
import functools
import os
import secrets
from dataclasses import dataclass, field

from . import fdinfo, log, tun
from .errors import (
    Denied,
    IfnameTaken,
    InvalidOptions,
    KernelError,
    NotATap,
    TapIntruded,
    TapLeased,
    Unsupported,
    VhostUnavailable,
)
from .fence import TAP_PREFIX
from .netlink import Bridge, Netlink, TapLink, TunInfo


@dataclass(frozen=True)
class VhostSpec:
    device: str
    force: bool


@dataclass(frozen=True)
class TapSpec:
    """A tap for tapd to create."""

    bridge: str
    ifname: str | None
    queues: int = 1
    vnet_hdr: bool | None = None  # None: if the kernel offers it
    sndbuf: int | None = None
    owner_uid: int | None = None
    owner_gid: int | None = None
    name_template: str = "tap{rand}"
    vhost: VhostSpec | None = None  # open one vhost fd per queue
    alias: str | None = None  # the lease tag
    #: bring the port up as it joins (False: a fence comes first, then bring_up)
    up: bool = True


@dataclass(frozen=True)
class AdoptSpec:
    """Tap queue fds that came from elsewhere (the client, a helper), to be
    checked, prepared as QEMU would, and attached to ``bridge``."""

    bridge: str
    fds: tuple[int, ...]
    sndbuf: int | None = None
    owner_uid: int | None = None  # give the tap to this uid (helper-made taps)
    owner_gid: int | None = None
    vhost: VhostSpec | None = None
    alias: str | None = None
    #: refuse the tap unless its TUNSETOWNER owner is this uid (None: no check)
    require_owner: int | None = None
    #: interfaces that already have a lease: never adopted twice
    leased: frozenset[int] = frozenset()
    #: bring the port up as it joins (False: a fence comes first, then bring_up)
    up: bool = True


@dataclass
class MadeTap:
    """A tap on its bridge.  Whoever holds this owns ``fds`` and ``vhost_fds``."""

    ifname: str
    ifindex: int
    bridge: str
    fds: list[int]
    vnet_hdr: bool
    vnet_hdr_len: int
    mac: str
    mtu: int
    sndbuf: int
    offloads: int = 0
    vhost_fds: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def new(cls, name: str, fds: list[int], vnet_hdr: bool, bridge: Bridge) -> MadeTap:
        """A tap just made (or taken in) for ``bridge``: tapd's own address
        for it, the bridge's MTU; its index and send buffer come later."""
        return cls(
            ifname=name,
            ifindex=0,
            bridge=bridge.name,
            fds=fds,
            vnet_hdr=vnet_hdr,
            vnet_hdr_len=tun.VIRTIO_NET_HDR_LEN if vnet_hdr else 0,
            mac=random_mac(),
            mtu=bridge.mtu,
            sndbuf=0,
        )

    def close(self) -> None:
        tun.close_all(self.fds + self.vhost_fds)
        self.fds, self.vhost_fds = [], []


def random_mac() -> str:
    """A locally administered unicast address starting fe:7a (TAP_PREFIX).

    A bridge takes the lowest address among its ports as its own unless it has
    one set; 0xFE keeps the address tapd gives a tap from becoming that, and
    has the local bit set and the multicast bit clear.  A VM can change it
    through its fd, so that is not what protects the bridge: tapd pins the
    bridge's own address (:meth:`tapd.netlink.Netlink.bridge`), and puts back
    any other address a tap takes (:meth:`tapd.lifecycle.Lifecycle._readdress`).
    """
    return ":".join(f"{b:02x}" for b in TAP_PREFIX + secrets.token_bytes(4))


#: how often to draw a new name when a generated one is already taken
_NAME_ATTEMPTS = 16
#: how many multi-queue taps to make for one request while others attach to them
_INTRUSION_ATTEMPTS = 8


def intrusion(info: TunInfo | None, spec: TapSpec, made: int | None = None) -> str | None:
    """Why the multi-queue tap just made for ``spec`` (``made`` queues of it,
    default all) may hold a queue of someone else's, or None when the kernel
    reports exactly what tapd made."""
    if info is None:
        return "it is gone, or is no tap any more"
    held = info.queues + info.disabled
    made = spec.queues if made is None else made
    if held != made:
        return (
            f"it holds {held} queues ({info.queues} attached, {info.disabled} disabled) "
            f"where tapd made {made}"
        )
    if (info.owner, info.group) != (spec.owner_uid, spec.owner_gid):
        return (
            f"its owner is uid {info.owner}, group {info.group} where tapd set "
            f"uid {spec.owner_uid}, group {spec.owner_gid}"
        )
    if info.persist:
        return "it was made persistent"
    return None


def adoption_problem(name: str, link: TapLink | None, uid: int) -> str | None:
    """Why a non-root client may not have tap ``name`` adopted, or None.

    tapd may only adopt a tap it could have watched its requester create: a
    VMM (or its manager) makes a tap with TUNSETIFF and passes it on at once,
    so it is down, nobody's port, not persistent, and TUNSETOWNER'd to the
    requester.  Owning it proves nothing by itself: anyone may attach to a tap
    without owner or group and then TUNSETOWNER it to themselves (tun_set_iff(),
    tun_not_capable(); TUNSETOWNER checks nothing more), as with an admin's
    `ip tuntap add` without `user`.  Such a tap is persistent, and one in use
    is up or a port: neither a master nor IFF_UP can be taken away without
    CAP_NET_ADMIN.  A client that attached could clear IFF_PERSIST, but then
    the tap is one nobody configured, which the kernel lets it have anyway.
    """
    if link is None:
        return f"tap {name!r} vanished while tapd checked it"
    owner = link.tun.owner
    if owner != uid:
        return (
            f"tap {name!r} is not yours (its owner is "
            f"{'nobody' if owner is None else f'uid {owner}'}); set TUNSETOWNER "
            "on the taps you make before handing them to tapd"
        )
    made_here = "tapd adopts only a tap fresh from its maker's TUNSETIFF"
    if link.master is not None:
        return f"tap {name!r} is already a port of another interface; {made_here}"
    if link.up:
        return f"tap {name!r} is up already; {made_here}"
    if link.tun.persist:
        return (
            f"tap {name!r} is persistent (made by ip tuntap add or kept with "
            f"TUNSETPERSIST), so tapd cannot tell who made it; {made_here}"
        )
    return None


class KernelTaps:
    def __init__(self, tun_device: str = tun.TUN_PATH) -> None:
        self.tun_device = tun_device
        self.netlink = Netlink()
        self._features: tun.Features | None = None

    @property
    def features(self) -> tun.Features:
        if self._features is None:
            self._features = tun.probe_features(self.tun_device)
        return self._features

    def _vnet_hdr(self, wanted: bool | None) -> bool:
        # QEMU's tap_open(): vnet_hdr defaults to on if the kernel has it;
        # vnet_hdr=on is then required.
        offered = self.features.vnet_hdr
        if wanted and not offered:
            raise Unsupported(
                "vnet_hdr=1 requested, but no kernel support for IFF_VNET_HDR available"
            )
        return offered if wanted is None else wanted

    def _create(
        self, spec: TapSpec, vnet_hdr: bool, queues: int | None = None
    ) -> tuple[str, list[int]]:
        """Create the device with ``queues`` queue fds (default: all of
        ``spec.queues``); it is multi-queue whenever ``spec.queues`` > 1."""
        if spec.queues > 1 and not self.features.multi_queue:
            raise Unsupported(
                "multiqueue required, but no kernel support for IFF_MULTI_QUEUE available"
            )
        count = spec.queues if queues is None else queues
        if spec.queues == 1:
            # tun_attach() refuses a second queue on a single-queue device
            # (EBUSY), so nobody can have slipped in: nothing to count.
            return self._create_named(spec, vnet_hdr, count)
        # A multi-queue device has no owner from its first TUNSETIFF until the
        # TUNSETOWNER right after it, and rtnetlink announces its name to any
        # listener: a queue attached in that instant would stay, reading and
        # sending the VM's traffic.  So count what the kernel says the device
        # holds; on a surplus remove it by index (the intruder's queue would
        # keep it alive after ours are closed) and make another.
        for _ in range(_INTRUSION_ATTEMPTS):
            name, fds = self._create_named(spec, vnet_hdr, count)
            try:
                index = tun.ifindex(name)
                problem = intrusion(self.netlink.tun_info(index), spec, count)
                if problem is not None:
                    log.get().warning("tap.create.intruded", ifname=name, problem=problem)
                    self.netlink.delete(index)
            except BaseException:
                tun.close_all(fds)
                raise
            if problem is None:
                return name, fds
            tun.close_all(fds)
        raise TapIntruded(
            f"another process attached to each of the {_INTRUSION_ATTEMPTS} taps tapd made "
            "for this request while it was being made; tapd removed them (see its log)"
        )

    def _create_named(self, spec: TapSpec, vnet_hdr: bool, count: int) -> tuple[str, list[int]]:
        """``count`` queues of the tap under the request's name, or a free name
        from the template; its owner and group set on its first queue."""
        create = functools.partial(
            tun.create_tap,
            queues=count,
            vnet_hdr=vnet_hdr,
            path=self.tun_device,
            owner_uid=spec.owner_uid,
            owner_gid=spec.owner_gid,
            multi_queue=spec.queues > 1,
        )
        if spec.ifname is not None:
            return spec.ifname, create(spec.ifname)
        uid = spec.owner_uid if spec.owner_uid is not None else 0
        for _ in range(_NAME_ATTEMPTS):
            name = spec.name_template.format(rand=secrets.token_hex(4), uid=uid)
            try:
                return name, create(name)
            except IfnameTaken:
                continue
        raise KernelError(
            f"could not find a free interface name from template {spec.name_template!r}"
        )

    def cached_bridge(self, name: str) -> Bridge | None:
        """``name`` if known and unchanged, without pyroute2 (any thread)."""
        return self.netlink.cached_bridge(name)

    def bridge(self, name: str) -> Bridge:
        """``name``, looked up if need be (worker thread)."""
        return self.netlink.bridge(name)

    def create(self, spec: TapSpec, bridge: Bridge) -> MadeTap:
        """The tap's queues, not yet prepared or attached.  For a single-queue
        tap no pyroute2 and no waits but the kernel's own (RTNL): the trio loop
        may call it.  A multi-queue tap is counted through pyroute2: only the
        worker thread makes those."""
        vnet_hdr = self._vnet_hdr(spec.vnet_hdr)
        name, fds = self._create(spec, vnet_hdr)
        return MadeTap.new(name, fds, vnet_hdr, bridge)

    def attach(self, made: MadeTap, bridge: Bridge, spec: TapSpec) -> None:
        """Prepare ``made`` and put it on ``bridge`` (as :meth:`create`, any
        thread).  On failure the caller closes ``made``."""
        self._attach(made, bridge, spec)

    def prepare(self, spec: TapSpec, bridge: Bridge) -> MadeTap:
        """A persistent tap for a VMM that opens it by name (worker thread).

        tapd opens one queue - multi-queue when ``spec.queues`` > 1, so that
        the VMM may attach that many - given to the requester on that queue
        (TUNSETOWNER/TUNSETGROUP: only that uid may attach without privilege,
        drivers/net/tun.c tun_not_capable()), makes it persistent, puts it on
        the bridge and closes its own queue: the tap stays, with no queue
        attached, until the VMM opens it.  Any failure
        clears persistence first, so the close removes what was made.
        """
        vnet_hdr = self._vnet_hdr(spec.vnet_hdr)
        name, fds = self._create(spec, vnet_hdr, queues=1)
        made = MadeTap.new(name, fds, vnet_hdr, bridge)
        (fd,) = fds
        persistent = False
        try:
            # _create gave the device to the requester on its first queue
            # (and counted a multi-queue one's): now it may outlive tapd's fd.
            tun.set_persist(fd, True)
            persistent = True
            made.ifindex = tun.ifindex(name)
            self.netlink.join_bridge(made.ifindex, name, bridge, made.mac, spec.alias, spec.up)
        except BaseException:
            if persistent:
                try:
                    tun.set_persist(fd, False)
                except KernelError:
                    self.netlink.delete(tun.ifindex(name))
            made.close()
            raise
        made.close()  # the tap stays: it is persistent
        return made

    def remove(self, index: int) -> bool:
        """Remove a tap by index, held or persistent (worker thread); False if
        it was already gone."""
        return self.netlink.delete(index)

    def adopt(self, spec: AdoptSpec) -> MadeTap:
        """Check fds someone else made, then treat them as :meth:`make` would.

        Follows net_init_tap()'s fds= branch: every fd must be a tap, of one
        device, with the same vnet_hdr.  The caller keeps ownership of
        ``spec.fds``; only vhost fds opened here end up in the result.
        """
        infos = []
        for i, fd in enumerate(spec.fds):
            # What the fd is, from procfs, before any ioctl on it: an ioctl on
            # a FUSE file waits for a server its sender may write (tapd.fdinfo).
            if fdinfo.tun_name(fd) is None:
                raise NotATap(
                    f"fd #{i} sent with the request is not a tap queue "
                    f"(the kernel says it is {fdinfo.link(fd) or 'nothing'})"
                )
            try:
                info = tun.tap_info(fd)
            except KernelError as exc:
                if exc.errno in (errno.ENOTTY, errno.EBADFD, errno.EINVAL, errno.EBADF):
                    raise NotATap(f"fd #{i} sent with the request is not a tap") from None
                raise
            if not info.is_tap:
                raise NotATap(f"fd #{i} sent with the request is a tun, not a tap")
            infos.append(info)
        names = {info.name for info in infos}
        if len(names) != 1:
            raise NotATap(
                "the fds sent with the request are queues of different devices: "
                + ", ".join(sorted(names))
            )
        if len({info.vnet_hdr for info in infos}) != 1:
            raise InvalidOptions("vnet_hdr not consistent across given tap fds")
        if not all(tun.in_our_netns(fd) for fd in spec.fds):
            raise NotATap(
                "the tap sent with the request lives in another network namespace than tapd's"
            )
        (name,) = names
        index = tun.ifindex(name)
        if index in spec.leased:
            raise TapLeased(f"tap {name!r} already has a lease; it cannot be adopted again")
        if spec.require_owner is not None:
            # Holding an fd proves nothing (see adoption_problem): only a tap
            # its requester could just have made may be moved, re-addressed
            # and leased.
            problem = adoption_problem(name, self.netlink.tap_link(index), spec.require_owner)
            if problem is not None:
                raise Denied(problem)
        bridge = self.netlink.bridge(spec.bridge)
        made = MadeTap.new(name, list(spec.fds), infos[0].vnet_hdr, bridge)
        try:
            self._attach(made, bridge, spec)
        except BaseException:
            tun.close_all(made.vhost_fds)  # the tap fds stay the caller's
            raise
        return made

    def _attach(self, made: MadeTap, bridge: Bridge, spec: TapSpec | AdoptSpec) -> None:
        """Prepare the queues, open vhost fds, then tag, attach and bring up."""
        self._prepare(made, spec.sndbuf)
        if isinstance(spec, AdoptSpec):
            # A tap tapd made has its owner from its first queue (create_tap).
            # Ownership is per device: one queue's fd is enough.
            if spec.owner_uid is not None:
                tun.set_owner(made.fds[0], spec.owner_uid)
            if spec.owner_gid is not None:
                tun.set_group(made.fds[0], spec.owner_gid)
        self._open_vhost(made, spec.vhost)
        made.ifindex = tun.ifindex(made.ifname)
        self.netlink.join_bridge(made.ifindex, made.ifname, bridge, made.mac, spec.alias, spec.up)

    def _prepare(self, made: MadeTap, sndbuf: int | None) -> None:
        # As QEMU's net_tap_fd_init() + tap_set_sndbuf() do for every queue:
        # offloads off until the guest negotiates them, the virtio-net header
        # length reset (another user may have changed it), and the send buffer
        # at sndbuf= clamped to INT_MAX, INT_MAX when absent or 0.
        size = min(sndbuf, tun.SNDBUF_DEFAULT) if sndbuf else tun.SNDBUF_DEFAULT
        for fd in made.fds:
            try:
                tun.set_offload(fd, 0)
            except KernelError as exc:
                made.warnings.append(f"TUNSETOFFLOAD ioctl() failed: {exc.message}")
            if made.vnet_hdr:
                tun.set_vnet_hdr_len(fd, made.vnet_hdr_len)
            try:
                tun.set_sndbuf(fd, size)
            except KernelError:
                if sndbuf is not None:  # QEMU: an error only when sndbuf= was given
                    raise
        made.sndbuf = tun.get_sndbuf(made.fds[0])

    def _open_vhost(self, made: MadeTap, vhost: VhostSpec | None) -> None:
        """One vhost fd per queue (net_init_tap_one() opens one per queue)."""
        if vhost is None:
            return
        try:
            for _ in made.fds:
                made.vhost_fds.append(tun.open_vhost(vhost.device))
        except OSError as exc:
            tun.close_all(made.vhost_fds)
            made.vhost_fds = []
            message = f"tap: open vhost char device failed: {os.strerror(exc.errno or 0)}"
            if vhost.force:
                raise VhostUnavailable(f"{message} ({vhost.device}; vhostforce=on)") from None
            made.warnings.append(f"{message} ({vhost.device}); continuing without vhost")

    def close(self) -> None:
        self.netlink.close()
