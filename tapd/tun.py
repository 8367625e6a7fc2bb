"""Everything tapd does through ``/dev/net/tun`` and ``ioctl``.

This module and :mod:`tapd.netlink` are the only two that reach the kernel.
Constants come from ``<linux/if_tun.h>`` and ``<linux/if.h>``; each function
is a thin, synchronous wrapper that turns a failed syscall into a
:class:`~tapd.errors.KernelError` (or a more precise error) with a message a
human can act on.  Callers run these off the trio loop.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import IfnameTaken, TunUnavailable, kernel_error

TUN_PATH = "/dev/net/tun"

# <asm-generic/ioctl.h>: _IOW('T', nr, int) / _IOR('T', nr, unsigned int), as
# spelled in <linux/if_tun.h>.
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETPERSIST = 0x400454CB  # _IOW('T', 203, int)
TUNSETOWNER = 0x400454CC  # _IOW('T', 204, int)
TUNSETGROUP = 0x400454CE  # _IOW('T', 206, int)
TUNGETFEATURES = 0x800454CF  # _IOR('T', 207, unsigned int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)
TUNGETSNDBUF = 0x800454D3  # _IOR('T', 211, int)
TUNSETSNDBUF = 0x400454D4  # _IOW('T', 212, int)
TUNGETVNETHDRSZ = 0x800454D7  # _IOR('T', 215, int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
TUNGETDEVNETNS = 0x000054E3  # _IO('T', 227): an fd for the device's netns

# <linux/if_tun.h> TUNSETIFF flags
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000

# <linux/if_tun.h> TUNSETOFFLOAD bits
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

#: <linux/if.h>: struct ifreq is a 16-byte name followed by a 24-byte union.
_IFREQ = struct.Struct("16sH22x")
_INT = struct.Struct("i")

#: <linux/virtio_net.h>: sizeof(struct virtio_net_hdr), the header length QEMU
#: sets with TUNSETVNETHDRSZ at init (net_tap_fd_init).
VIRTIO_NET_HDR_LEN = 10

#: QEMU's tap_set_sndbuf(): no sndbuf= (or 0) means INT_MAX, larger is clamped.
SNDBUF_DEFAULT = 0x7FFF_FFFF


@dataclass(frozen=True)
class Features:
    """What this kernel's tun driver offers (``TUNGETFEATURES``)."""

    flags: int

    @property
    def vnet_hdr(self) -> bool:
        return bool(self.flags & IFF_VNET_HDR)

    @property
    def multi_queue(self) -> bool:
        return bool(self.flags & IFF_MULTI_QUEUE)


@dataclass(frozen=True)
class TapInfo:
    """``TUNGETIFF`` on a queue fd: the device's name and its TUNSETIFF flags."""

    name: str
    flags: int

    @property
    def is_tap(self) -> bool:
        return bool(self.flags & IFF_TAP)

    @property
    def vnet_hdr(self) -> bool:
        return bool(self.flags & IFF_VNET_HDR)


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunUnavailable(
            f"{path} does not exist; load the tun module (modprobe tun)",
            errno.ENOENT,
        ) from None
    except OSError as exc:
        raise kernel_error(exc, f"opening {path}") from None


def probe_features(path: str = TUN_PATH) -> Features:
    fd = _open(path)
    try:
        buf = fcntl.ioctl(fd, TUNGETFEATURES, _INT.pack(0))
        return Features(flags=_INT.unpack(buf)[0] & 0xFFFF_FFFF)
    except OSError as exc:
        raise kernel_error(exc, "asking the tun driver for its features") from None
    finally:
        os.close(fd)


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _setiff(fd: int, name: str, flags: int) -> str:
    buf = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
    raw: bytes = _IFREQ.unpack(buf)[0]
    return raw.rstrip(b"\0").decode()


def create_tap(
    name: str,
    *,
    queues: int = 1,
    vnet_hdr: bool = True,
    path: str = TUN_PATH,
    owner_uid: int | None = None,
    owner_gid: int | None = None,
    multi_queue: bool | None = None,
) -> list[int]:
    """Create tap ``name`` with ``queues`` queue fds and return them.

    The first ``TUNSETIFF`` carries ``IFF_TUN_EXCL``: without it the kernel
    would *attach* to an existing device of that name instead of failing
    (drivers/net/tun.c: tun_set_iff).  The owner and group are set on that
    first queue, before any other is attached: tun_set_iff() lets anyone
    attach a queue to a device that has neither (tun_not_capable()), and a
    queue attached then keeps working after TUNSETOWNER.  The instant between
    the first TUNSETIFF and TUNSETOWNER cannot be closed (TUNSETOWNER needs an
    attached queue), so whoever makes a multi-queue tap must still count its
    queues (see :meth:`tapd.taps.KernelTaps`); a single-queue tap refuses a
    second queue with EBUSY (tun_attach()).  Later queues attach to the device
    this call just made.  On any failure every fd opened so far is closed,
    which removes the (non-persistent) device with it.  ``multi_queue``
    (default: ``queues`` > 1) makes an ``IFF_MULTI_QUEUE`` device even with
    one queue fd, for a VMM that attaches its queues itself.
    """
    flags = IFF_TAP | IFF_NO_PI
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    if queues > 1 if multi_queue is None else multi_queue:
        flags |= IFF_MULTI_QUEUE
    fds: list[int] = []
    try:
        for queue in range(queues):
            fd = _open(path)
            fds.append(fd)
            try:
                _setiff(fd, name, flags | (IFF_TUN_EXCL if queue == 0 else 0))
            except OSError as exc:
                if queue == 0 and exc.errno == errno.EBUSY:
                    raise IfnameTaken(
                        f"an interface named {name!r} already exists; "
                        "choose another ifname or leave it out"
                    ) from None
                raise kernel_error(exc, f"creating queue {queue} of tap {name!r}") from None
            if queue == 0:
                if owner_uid is not None:
                    set_owner(fd, owner_uid)
                if owner_gid is not None:
                    set_group(fd, owner_gid)
    except BaseException:
        close_all(fds)
        raise
    return fds


class Unpersist(enum.Enum):
    #: persistence cleared: the kernel removes the tap as its last queue
    #: closes, now if tapd's was the last
    CLEARED = "cleared"
    #: a process holds the tap and tapd could not attach: nothing changed
    HELD = "held"
    #: no such tap any more (or its name now means another device)
    GONE = "gone"


def unpersist(name: str, flags: int, index: int, path: str = TUN_PATH) -> Unpersist:
    """Clear TUNSETPERSIST on tap ``name`` (interface ``index``) by
    attaching a queue of tapd's own, then close that queue.

    Whether anyone else still holds the tap is decided by the kernel in the
    same step, with no window: a single-queue tap whose queue is attached
    refuses a second one (tun_attach(): EBUSY), and closing tapd's queue of
    a non-persistent tap unregisters it exactly when it was the last
    (__tun_detach()).  ``flags`` must be the device's own (TUN_FEATURES are
    copied from the attaching file onto the device).  TUNSETIFF by name makes
    a tap when none has that name: one made here (its index is not
    ``index``) is ours alone and goes with our fd.
    """
    fd = _open(path)
    try:
        try:
            _setiff(fd, name, flags)
        except OSError as exc:
            # EBUSY: a single-queue tap's queue is attached; E2BIG: a
            # multi-queue tap has all the queues it may (tun_attach()), every
            # one of them open somewhere.
            if exc.errno in (errno.EBUSY, errno.E2BIG):
                return Unpersist.HELD
            raise kernel_error(exc, f"attaching to tap {name!r}") from None
        try:
            if _ifreq_int(name, SIOCGIFINDEX) != index:
                return Unpersist.GONE
        except OSError:
            return Unpersist.GONE
        _set_arg(fd, TUNSETPERSIST, 0, f"clearing persistence of tap {name!r}")
        return Unpersist.CLEARED
    finally:
        os.close(fd)


def tap_info(fd: int) -> TapInfo:
    try:
        buf = fcntl.ioctl(fd, TUNGETIFF, _IFREQ.pack(b"", 0))
    except OSError as exc:
        raise kernel_error(exc, f"reading the tap behind fd {fd}") from None
    raw, flags = _IFREQ.unpack(buf)
    return TapInfo(name=raw.rstrip(b"\0").decode(errors="replace"), flags=flags)


def _set_int(fd: int, request: int, value: int, doing: str) -> None:
    try:
        fcntl.ioctl(fd, request, _INT.pack(value))
    except OSError as exc:
        raise kernel_error(exc, doing) from None


def _get_int(fd: int, request: int, doing: str) -> int:
    try:
        return int(_INT.unpack(fcntl.ioctl(fd, request, _INT.pack(0)))[0])
    except OSError as exc:
        raise kernel_error(exc, doing) from None


def set_sndbuf(fd: int, size: int) -> None:
    _set_int(fd, TUNSETSNDBUF, size, "setting the tap's send buffer")


def get_sndbuf(fd: int) -> int:
    return _get_int(fd, TUNGETSNDBUF, "reading the tap's send buffer")


def set_vnet_hdr_len(fd: int, length: int) -> None:
    _set_int(fd, TUNSETVNETHDRSZ, length, "setting the tap's vnet header length")


def get_vnet_hdr_len(fd: int) -> int:
    return _get_int(fd, TUNGETVNETHDRSZ, "reading the tap's vnet header length")


def set_offload(fd: int, offload: int) -> None:
    _set_arg(fd, TUNSETOFFLOAD, offload, "setting the tap's offloads")


def _set_arg(fd: int, request: int, value: int, doing: str) -> None:
    # TUNSETOWNER, TUNSETGROUP, TUNSETPERSIST and TUNSETOFFLOAD take their value
    # as the ioctl argument itself, not through a pointer (drivers/net/tun.c:
    # __tun_chr_ioctl uses `arg` directly for them).
    try:
        fcntl.ioctl(fd, request, value)
    except OSError as exc:
        raise kernel_error(exc, doing) from None


def set_owner(fd: int, uid: int) -> None:
    _set_arg(fd, TUNSETOWNER, uid, f"giving the tap to uid {uid}")


def set_persist(fd: int, persist: bool) -> None:
    """TUNSETPERSIST: a persistent tap outlives its last queue fd."""
    _set_arg(
        fd,
        TUNSETPERSIST,
        int(persist),
        "making the tap persistent" if persist else "making the tap non-persistent",
    )


def set_group(fd: int, gid: int) -> None:
    _set_arg(fd, TUNSETGROUP, gid, f"giving the tap to gid {gid}")


def in_our_netns(fd: int) -> bool:
    """Whether the tap behind ``fd`` lives in tapd's own network namespace.

    A name is only unique within one namespace: before acting on a client's tap
    by name, tapd makes sure the name means the same device here.
    """
    try:
        nsfd = fcntl.ioctl(fd, TUNGETDEVNETNS, 0)
    except OSError as exc:
        raise kernel_error(exc, "asking which network namespace the tap is in") from None
    try:
        return os.fstat(nsfd).st_ino == os.stat("/proc/self/ns/net").st_ino
    finally:
        os.close(nsfd)


def open_vhost(path: str) -> int:
    """Open the vhost-net device for one queue.

    tapd only opens it: VHOST_SET_OWNER binds the device to the memory of the
    process that calls it, which must be the VMM, not tapd.
    """
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


# <linux/sockios.h>
SIOCGIFMTU = 0x8921
SIOCGIFINDEX = 0x8933
_IFREQ_INT = struct.Struct("16si20x")

#: an AF_UNIX socket to address interface ioctls to, made on first use.  The
#: trio loop and the kernel worker both use it: these ioctls keep no state on
#: the socket, and two threads racing to make it would only make two.
_ctl: socket.socket | None = None


def _ifreq_int(name: str, request: int) -> int:
    global _ctl
    if _ctl is None:
        _ctl = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    buf = fcntl.ioctl(_ctl, request, _IFREQ_INT.pack(name.encode(), 0))
    return int(_IFREQ_INT.unpack(buf)[1])


def link_state(name: str) -> tuple[int, int] | None:
    """(ifindex, MTU) of interface ``name`` here, or None if there is none.

    Two ioctls: cheap enough to check a cached bridge on every request instead
    of following every link event.
    """
    try:
        return _ifreq_int(name, SIOCGIFINDEX), _ifreq_int(name, SIOCGIFMTU)
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            return None
        raise kernel_error(exc, f"looking up interface {name!r}") from None


def ifindex(name: str) -> int:
    """The interface index of ``name`` in tapd's own network namespace."""
    try:
        return _ifreq_int(name, SIOCGIFINDEX)
    except OSError as exc:
        raise kernel_error(exc, f"looking up interface {name!r}") from None
