"""Traffic shaping: the token bucket filters that hold a guest to its rates.

Part of tapd's rtnetlink side (with :mod:`tapd.netlink`, whose
:class:`~tapd.netlink.Netlink` takes these methods in): everything here goes
through pyroute2's IPRoute, and so runs on the
:class:`~tapd.worker.KernelWorker` thread only.
"""

from __future__ import annotations

import contextlib
import errno
import typing

from .errors import KernelError, kernel_error
from .fence import ifb_name, ifb_tap
from .ports import netlink_error

if typing.TYPE_CHECKING:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    from .netlink import Link

#: <linux/if_ether.h>: every protocol, for a filter that matches every frame
ETH_P_ALL = 0x0003
#: <linux/pkt_sched.h>: the parents of a device's root and ingress qdiscs
_TC_H_ROOT = 0xFFFFFFFF
_TC_H_INGRESS = 0xFFFFFFF1


def _oserror(exc: NetlinkError) -> OSError:
    return OSError(exc.code, str(exc))


def _tbf(bits: int) -> dict[str, object]:
    """tbf's parameters for ``bits`` a second: a bucket of 20 ms of traffic
    (at least 16 KiB, so that a full-size frame and a timer tick at HZ=100
    always fit) and 50 ms of queue before dropping."""
    return {"rate": f"{bits}bit", "burst": max(16384, bits // 8 // 50), "latency": "50ms"}


class Shaping:
    """tbf qdiscs on a tap and on the ifb device beside it; mixed into
    :class:`tapd.netlink.Netlink`, which supplies the worker thread's IPRoute."""

    @property
    def _ip(self) -> IPRoute:
        raise NotImplementedError

    def link(self, *, index: int = 0, name: str | None = None) -> Link | None:
        raise NotImplementedError

    def links(self) -> list[Link]:
        raise NotImplementedError

    def shape(self, index: int, ingress: int | None, egress: int | None) -> None:
        """Token bucket filters for what the guest on tap ``index`` receives
        (``ingress``, bits a second: the tap's root qdisc, since it leaves the
        host through the tap) and sends (``egress``: redirected from the tap's
        ingress to an ifb device of its own, whose root qdisc shapes it; this
        kernel has no ingress policer).  Idempotent: a restarted tapd runs it
        again."""
        try:
            if ingress is not None:
                self._ip.tc("replace", "tbf", index=index, handle="1:", **_tbf(ingress))
            if egress is None:
                return
            name = ifb_name(index)
            ifb = self._ifb(name)
            if ifb is None:
                self._ip.link("add", ifname=name, kind="ifb")
                ifb = self._ifb(name)
                assert ifb is not None
            self._ip.link("set", index=ifb, state="up")
            self._ip.tc("replace", "tbf", index=ifb, handle="1:", **_tbf(egress))
            # A fresh ingress qdisc each time, so the one redirect is never doubled.
            self._del_qdisc(index, _TC_H_INGRESS)
            self._ip.tc("add", "ingress", index=index, handle="ffff:")
            self._ip.tc(
                "add-filter",
                "u32",
                index=index,
                parent="ffff:",
                protocol=ETH_P_ALL,
                prio=1,
                keys=["0x0/0x0+0"],  # every frame
                target=0x10001,  # a classid u32 requires; the redirect decides
                action={"kind": "mirred", "direction": "egress", "action": "redirect",
                        "ifindex": ifb},
            )  # fmt: skip
        except netlink_error() as exc:
            raise kernel_error(_oserror(exc), f"shaping tap {index}") from None

    def unshape(self, index: int, tap_too: bool = False) -> None:
        """Remove the ifb that shaped tap ``index``'s guest (its qdiscs go with
        the tap; ``tap_too``: the tap stays, so remove them as well)."""
        if tap_too:
            self._del_qdisc(index, _TC_H_ROOT)
            self._del_qdisc(index, _TC_H_INGRESS)
        with contextlib.suppress(KernelError):
            ifb = self._ifb(ifb_name(index))
            if ifb is not None:
                with contextlib.suppress(netlink_error()):
                    self._ip.link("del", index=ifb)

    def _ifb(self, name: str) -> int | None:
        """The index of tapd's ifb device ``name``, None if there is none; an
        interface of that name that is no ifb is never taken for one (what the
        guest sends would be redirected to it)."""
        link = self.link(name=name)
        if link is None:
            return None
        if link.kind != "ifb":
            raise KernelError(
                f"interface {name!r} is a {link.kind or 'plain'} device where tapd shapes "
                "through an ifb of that name; remove or rename it"
            )
        return link.index

    def _del_qdisc(self, index: int, parent: int) -> None:
        """Remove the qdisc at ``parent`` (root or ingress), if there is one.
        RTM_DELQDISC needs the parent (tc_get_qdisc(): "Classid cannot be
        zero"); the kind is not asked for, so none is named."""
        handle = "ffff:" if parent == _TC_H_INGRESS else "1:"
        try:
            self._ip.tc("del", index=index, handle=handle, parent=parent)
        except netlink_error() as exc:
            if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise

    def orphan_ifbs(self) -> list[int]:
        """Indexes of ifb devices tapd made for taps that are gone."""
        links = {link.index: link for link in self.links()}
        orphans = []
        for index, link in links.items():
            tap = ifb_tap(link.name)
            if tap is not None and tap not in links and link.kind == "ifb":
                orphans.append(index)
        return orphans
