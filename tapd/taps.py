"""Making a tap that is ready for a VM: the one intention tapd carries out.

:class:`KernelTaps` strings :mod:`tapd.tun` and :mod:`tapd.netlink` together
and runs (synchronously) on the kernel worker thread.  Code above it only sees
the :class:`TapMaker` protocol, so it can be tested against a fake as well as
against the real kernel.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Protocol

from . import tun
from .errors import IfnameTaken, KernelError, Unsupported
from .netlink import Netlink


@dataclass(frozen=True)
class TapSpec:
    bridge: str
    ifname: str | None
    queues: int = 1
    vnet_hdr: bool | None = None  # None: if the kernel offers it
    sndbuf: int | None = None
    owner_uid: int | None = None
    name_template: str = "tap{rand}"


@dataclass
class MadeTap:
    """A tap on its bridge.  Whoever holds this owns ``fds`` and must close them."""

    ifname: str
    bridge: str
    fds: list[int]
    vnet_hdr: bool
    vnet_hdr_len: int
    mac: str
    mtu: int
    warnings: list[str] = field(default_factory=list)


class TapMaker(Protocol):
    def make(self, spec: TapSpec) -> MadeTap: ...


def random_mac() -> str:
    """A locally administered unicast address whose first byte is 0xFE.

    A bridge takes the lowest address among its ports as its own unless it has
    one set; 0xFE keeps a VM's tap from becoming that (as qemu-bridge-helper
    does), and 0xFE has the local bit set and the multicast bit clear.
    """
    return "fe:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))


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
        for _ in range(_NAME_ATTEMPTS):
            name = spec.name_template.format(
                rand=secrets.token_hex(4), uid=spec.owner_uid if spec.owner_uid is not None else 0
            )
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

    def make(self, spec: TapSpec) -> MadeTap:
        bridge = self.netlink.bridge(spec.bridge)
        vnet_hdr = self._vnet_hdr(spec.vnet_hdr)
        name, fds = self._create(spec, vnet_hdr)
        try:
            made = MadeTap(
                ifname=name,
                bridge=bridge.name,
                fds=fds,
                vnet_hdr=vnet_hdr,
                vnet_hdr_len=tun.VIRTIO_NET_HDR_LEN if vnet_hdr else 0,
                mac=random_mac(),
                mtu=bridge.mtu,
            )
            self._prepare_queues(spec, made)
            if spec.owner_uid is not None:
                tun.set_owner(fds[0], spec.owner_uid)
            self.netlink.join_bridge(tun.ifindex(name), name, bridge, made.mac)
        except BaseException:
            # Closing the last fd of a non-persistent tap removes the device.
            tun.close_all(fds)
            raise
        return made

    def _prepare_queues(self, spec: TapSpec, made: MadeTap) -> None:
        # As QEMU's net_tap_fd_init() + tap_set_sndbuf() do for every queue.
        sndbuf = min(spec.sndbuf, tun.SNDBUF_DEFAULT) if spec.sndbuf else tun.SNDBUF_DEFAULT
        for fd in made.fds:
            try:
                tun.set_offload(fd, 0)
            except KernelError as exc:
                made.warnings.append(f"TUNSETOFFLOAD failed: {exc.message}")
            if made.vnet_hdr:
                tun.set_vnet_hdr_len(fd, made.vnet_hdr_len)
            try:
                tun.set_sndbuf(fd, sndbuf)
            except KernelError:
                # QEMU: an error only when sndbuf= was given.
                if spec.sndbuf is not None:
                    raise

    def close(self) -> None:
        self.netlink.close()
