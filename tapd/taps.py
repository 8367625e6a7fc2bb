"""Making taps ready for a VM: the intentions tapd carries out in the kernel.

:class:`KernelTaps` strings :mod:`tapd.tun` and :mod:`tapd.netlink` together,
synchronously.  Making a single-queue tap (:meth:`KernelTaps.create` and
:meth:`KernelTaps.attach`) is a handful of syscalls that the trio loop makes
itself; :meth:`KernelTaps.bridge`, :meth:`KernelTaps.adopt` and larger taps
run on the kernel worker thread (see :meth:`tapd.service.Service._make`).
Code above it only sees the :class:`TapMaker` protocol, so it can be tested
against a fake as well as against the real kernel.
"""

from __future__ import annotations

import errno
import os
import secrets
from dataclasses import dataclass, field
from typing import Protocol

from . import fdinfo, tun
from .errors import (
    Denied,
    IfnameTaken,
    InvalidOptions,
    KernelError,
    NotATap,
    Unsupported,
    VhostUnavailable,
)
from .netlink import Bridge, Netlink


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

    def close(self) -> None:
        tun.close_all(self.fds + self.vhost_fds)
        self.fds, self.vhost_fds = [], []


class TapMaker(Protocol):
    def cached_bridge(self, name: str) -> Bridge | None: ...

    def bridge(self, name: str) -> Bridge: ...

    def create(self, spec: TapSpec, bridge: Bridge) -> MadeTap: ...

    def attach(self, made: MadeTap, bridge: Bridge, spec: TapSpec) -> None: ...

    def make(self, spec: TapSpec, bridge: Bridge) -> MadeTap: ...

    def adopt(self, spec: AdoptSpec) -> MadeTap: ...


def random_mac() -> str:
    """A locally administered unicast address whose first byte is 0xFE.

    A bridge takes the lowest address among its ports as its own unless it has
    one set; 0xFE keeps a VM's tap from becoming that (as qemu-bridge-helper
    does), and 0xFE has the local bit set and the multicast bit clear.
    """
    return "fe:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))


def _made(name: str, fds: list[int], vnet_hdr: bool, bridge: Bridge) -> MadeTap:
    return MadeTap(
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


#: how often to draw a new name when a generated one is already taken
_NAME_ATTEMPTS = 16


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

    def _create(self, spec: TapSpec, vnet_hdr: bool) -> tuple[str, list[int]]:
        if spec.queues > 1 and not self.features.multi_queue:
            raise Unsupported(
                "multiqueue required, but no kernel support for IFF_MULTI_QUEUE available"
            )
        if spec.ifname is not None:
            fds = tun.create_tap(
                spec.ifname, queues=spec.queues, vnet_hdr=vnet_hdr, path=self.tun_device
            )
            return spec.ifname, fds
        uid = spec.owner_uid if spec.owner_uid is not None else 0
        for _ in range(_NAME_ATTEMPTS):
            name = spec.name_template.format(rand=secrets.token_hex(4), uid=uid)
            try:
                fds = tun.create_tap(
                    name, queues=spec.queues, vnet_hdr=vnet_hdr, path=self.tun_device
                )
            except IfnameTaken:
                continue
            return name, fds
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
        """The tap's queues, not yet prepared or attached.  No pyroute2 and no
        waits but the kernel's own (RTNL): the trio loop may call it."""
        vnet_hdr = self._vnet_hdr(spec.vnet_hdr)
        name, fds = self._create(spec, vnet_hdr)
        return _made(name, fds, vnet_hdr, bridge)

    def attach(self, made: MadeTap, bridge: Bridge, spec: TapSpec) -> None:
        """Prepare ``made`` and put it on ``bridge`` (as :meth:`create`, any
        thread).  On failure the caller closes ``made``."""
        self._attach(made, bridge, spec)

    def make(self, spec: TapSpec, bridge: Bridge) -> MadeTap:
        """:meth:`create` and :meth:`attach`; on failure the tap is removed."""
        made = self.create(spec, bridge)
        try:
            self._attach(made, bridge, spec)
        except BaseException:
            # Closing the last fd of a non-persistent tap removes the device.
            made.close()
            raise
        return made

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
            raise Denied(f"tap {name!r} already has a lease; it cannot be adopted again")
        if spec.require_owner is not None:
            # Anyone may TUNSETIFF-attach to a tap that has no owner and no
            # group: holding an fd proves nothing.  Only a tap the kernel says
            # is the requester's own may be moved, re-addressed and leased.
            owner = self.netlink.tap_owner(index)
            if owner != spec.require_owner:
                raise Denied(
                    f"tap {name!r} is not yours (its owner is "
                    f"{'nobody' if owner is None else f'uid {owner}'}); set TUNSETOWNER "
                    "on the taps you make before handing them to tapd"
                )
        bridge = self.netlink.bridge(spec.bridge)
        made = _made(name, list(spec.fds), infos[0].vnet_hdr, bridge)
        try:
            self._attach(made, bridge, spec)
        except BaseException:
            tun.close_all(made.vhost_fds)  # the tap fds stay the caller's
            raise
        return made

    def _attach(self, made: MadeTap, bridge: Bridge, spec: TapSpec | AdoptSpec) -> None:
        """Prepare the queues, open vhost fds, then tag, attach and bring up."""
        self._prepare(made, spec.sndbuf, spec.owner_uid, spec.owner_gid)
        self._open_vhost(made, spec.vhost)
        made.ifindex = tun.ifindex(made.ifname)
        self.netlink.join_bridge(made.ifindex, made.ifname, bridge, made.mac, spec.alias)

    def _prepare(
        self, made: MadeTap, sndbuf: int | None, owner_uid: int | None, owner_gid: int | None
    ) -> None:
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
        # Ownership is per device: one queue's fd is enough.
        if owner_uid is not None:
            tun.set_owner(made.fds[0], owner_uid)
        if owner_gid is not None:
            tun.set_group(made.fds[0], owner_gid)

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
