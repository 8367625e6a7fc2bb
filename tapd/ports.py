"""Bridge ports: their flags, the FDB entries that fence them, their VLANs.

Part of tapd's rtnetlink side (with :mod:`tapd.netlink`, whose
:class:`~tapd.netlink.Netlink` takes these methods in): everything here goes
through pyroute2's IPRoute, and so runs on the
:class:`~tapd.worker.KernelWorker` thread only.
"""

from __future__ import annotations

import errno

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import GuestMacInUse, kernel_error

# <linux/neighbour.h>: a bridge FDB entry that points at a port (not the port
# device's own table), and "static" as bridge(8) spells NUD_NOARP
NTF_MASTER = 0x04
NTF_STICKY = 0x40  # an entry learning on another port may not move
NUD_NOARP = 0x40


def _oserror(exc: NetlinkError) -> OSError:
    return OSError(exc.code, str(exc))


class BridgePorts:
    """What tapd sets on a bridge port; mixed into :class:`tapd.netlink.Netlink`,
    which supplies the worker thread's IPRoute."""

    @property
    def _ip(self) -> IPRoute:
        raise NotImplementedError

    def set_port(self, index: int, flags: dict[str, bool], static_mac: str | None) -> None:
        """Bridge port flags (IFLA_BRPORT_* through IFLA_INFO_SLAVE_DATA, which
        rtnetlink applies only to a port that already has its master) and a
        static FDB entry for ``static_mac`` on that port (what ``bridge fdb
        add MAC dev PORT master static`` does: NTF_MASTER, NUD_NOARP).

        The entry is added, never replaced: net/bridge/br_fdb.c fdb_add_entry()
        moves an existing entry to the new port and clears BR_FDB_LOCAL, so a
        replace with the bridge's own address, another port's, or one the
        bridge learnt (the uplink's router) would send that address's traffic
        to this guest.  An address the bridge already knows is refused, unless
        it is this port's own static entry (a restarted tapd fencing again)."""
        try:
            if flags:
                self._ip.brport("set", index=index, **{k: int(v) for k, v in flags.items()})
            if static_mac is not None:
                try:
                    # sticky: learning elsewhere (the uplink, an unfenced
                    # port) never roams it (br_fdb_update(): BR_FDB_STICKY)
                    self._ip.fdb(
                        "add",
                        ifindex=index,
                        lladdr=static_mac,
                        flags=NTF_MASTER | NTF_STICKY,
                        state=NUD_NOARP,
                    )
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
                    if not self._static_on(index, static_mac):
                        raise GuestMacInUse(
                            f"guest_mac {static_mac} is already known to the bridge (its own "
                            "address, a port's, or a neighbour's it learnt); leave guest_mac "
                            "out and tapd picks a free one"
                        ) from None
        except NetlinkError as exc:
            raise kernel_error(_oserror(exc), f"fencing bridge port {index}") from None

    def _static_on(self, index: int, mac: str) -> bool:
        """Whether port ``index`` has a static FDB entry for ``mac``."""
        return any(
            entry.get("NDA_LLADDR") == mac
            and entry["ifindex"] == index
            and entry["state"] & NUD_NOARP
            and entry.get("NDA_MASTER") is not None
            for entry in self._ip.fdb("dump", ifindex=index)
        )

    def static_entries(self, bridge: int) -> set[tuple[int, str]]:
        """(port index, MAC) of every static FDB entry on bridge ``bridge``
        that points at a port: one dump, whatever the number of leases."""
        try:
            return {
                (int(entry["ifindex"]), str(entry.get("NDA_LLADDR")))
                for entry in self._ip.fdb("dump", master=bridge)
                if entry["state"] & NUD_NOARP and entry["ifindex"] != bridge
            }
        except NetlinkError as exc:
            raise kernel_error(_oserror(exc), f"listing the FDB of bridge {bridge}") from None
