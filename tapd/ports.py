"""Bridge ports: their flags, the FDB entries that fence them, their VLANs.

Part of tapd's rtnetlink side (with :mod:`tapd.netlink`, whose
:class:`~tapd.netlink.Netlink` takes these methods in): everything here goes
through pyroute2's IPRoute, and so runs on the
:class:`~tapd.worker.KernelWorker` thread only.
"""

from __future__ import annotations

import errno
import typing

from .errors import BridgeNotFound, GuestMacInUse, NotABridge, kernel_error

if typing.TYPE_CHECKING:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    from .netlink import Link

# <linux/neighbour.h>: a bridge FDB entry that points at a port (not the port
# device's own table), and "static" as bridge(8) spells NUD_NOARP
NTF_MASTER = 0x04
NTF_STICKY = 0x40  # an entry learning on another port may not move
NUD_NOARP = 0x40

# <linux/if_bridge.h>: struct bridge_vlan_info's flags
BRIDGE_VLAN_INFO_PVID = 0x2  # untagged frames arriving on the port go in this VLAN
BRIDGE_VLAN_INFO_UNTAGGED = 0x4  # frames of this VLAN leave the port untagged
#: a port's VLANs as tapd compares them: vid -> those two flags
PortVlans = dict[int, int]
ACCESS = BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED


def wanted_vlans(access: int | None, tagged: tuple[int, ...]) -> PortVlans:
    """The VLANs a port of ``access`` (untagged, its PVID) and ``tagged``
    (carried tagged) has, and no other."""
    vlans = dict.fromkeys(tagged, 0)
    if access is not None:
        vlans[access] = ACCESS
    return vlans


def netlink_error() -> type[NetlinkError]:
    """pyroute2's NetlinkError, for ``except netlink_error() as exc:`` around
    IPRoute's calls: an except clause is evaluated only when something is
    raised, so pyroute2 stays unimported until IPRoute is first used (see
    :mod:`tapd.netlink`)."""
    from pyroute2.netlink.exceptions import NetlinkError

    return typing.cast("type[NetlinkError]", NetlinkError)


def _oserror(exc: NetlinkError) -> OSError:
    return OSError(exc.code, str(exc))


class BridgePorts:
    """What tapd sets on a bridge port; mixed into :class:`tapd.netlink.Netlink`,
    which supplies the worker thread's IPRoute."""

    @property
    def _ip(self) -> IPRoute:
        raise NotImplementedError

    def link(self, *, index: int = 0, name: str | None = None) -> Link | None:
        raise NotImplementedError

    def set_port(
        self, index: int, flags: dict[str, bool], static_mac: str | None, vlan: int | None = None
    ) -> None:
        """Bridge port flags (IFLA_BRPORT_* through IFLA_INFO_SLAVE_DATA, which
        rtnetlink applies only to a port that already has its master) and a
        static FDB entry for ``static_mac`` on that port (what ``bridge fdb
        add MAC dev PORT master static`` does: NTF_MASTER, NUD_NOARP), in
        VLAN ``vlan`` when the port is an access port of a filtering bridge
        (its FDB is per VLAN: br_fdb_find_rcu() looks a locked port's frame
        up in the VLAN it arrived in, the PVID for an untagged one).

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
                        **({} if vlan is None else {"vlan": vlan}),
                    )
                except netlink_error() as exc:
                    if exc.code != errno.EEXIST:
                        raise
                    if not self._static_on(index, static_mac, vlan):
                        raise GuestMacInUse(
                            f"guest_mac {static_mac} is already known to the bridge (its own "
                            "address, a port's, or a neighbour's it learnt); leave guest_mac "
                            "out and tapd picks a free one"
                        ) from None
        except netlink_error() as exc:
            raise kernel_error(_oserror(exc), f"fencing bridge port {index}") from None

    def _static_on(self, index: int, mac: str, vlan: int | None) -> bool:
        """Whether port ``index`` has a static FDB entry for ``mac`` (in ``vlan``)."""
        return any(
            entry.get("NDA_LLADDR") == mac
            and entry["ifindex"] == index
            and entry["state"] & NUD_NOARP
            and entry.get("NDA_MASTER") is not None
            and (vlan is None or entry.get("NDA_VLAN") == vlan)
            for entry in self._ip.fdb("dump", ifindex=index)
        )

    def vlan_filtering(self, bridge: str) -> bool:
        """Whether bridge ``bridge`` filters VLANs (IFLA_BR_VLAN_FILTERING; a
        kernel without CONFIG_BRIDGE_VLAN_FILTERING does not report it)."""
        from .netlink import IFLA_BR_VLAN_FILTERING

        link = self.link(name=bridge)
        if link is None:
            raise BridgeNotFound(
                f"bridge {bridge!r} does not exist; create it "
                f"(ip link add {bridge} type bridge vlan_filtering 1) or ask for another"
            )
        if link.kind != "bridge":
            raise NotABridge(f"interface {bridge!r} is not a bridge; name a Linux bridge in br=")
        return bool(link.datum(IFLA_BR_VLAN_FILTERING))

    def port_vlans(self, index: int) -> PortVlans:
        """The VLANs of bridge port ``index`` now, with their PVID and
        untagged flags (an AF_BRIDGE dump with RTEXT_FILTER_BRVLAN: the
        bridge answers dumps only, one entry a VLAN)."""
        found: PortVlans = {}
        try:
            for msg in self._ip.get_vlans(index=index):
                spec = msg.get_attr("IFLA_AF_SPEC")
                if msg["index"] != index or spec is None:
                    continue
                for info in spec.get_attrs("IFLA_BRIDGE_VLAN_INFO"):
                    found[int(info["vid"])] = int(info["flags"]) & ACCESS
        except netlink_error() as exc:
            raise kernel_error(_oserror(exc), f"listing the VLANs of port {index}") from None
        return found

    def set_vlans(self, index: int, access: int | None, tagged: tuple[int, ...]) -> PortVlans:
        """Make port ``index`` an untagged member of ``access`` alone (its
        PVID) and a tagged member of ``tagged``: every other VLAN goes, the
        bridge's default_pvid (which a port joins in) among them.  Idempotent:
        a restarted tapd repairs a port whose VLANs were changed.  Returns
        what it changed (vid -> the flags it had, -1 for one it lacked).

        What is not wanted goes first, so that a port changed while up is
        for a moment in fewer VLANs, never in one it should not be."""
        want = wanted_vlans(access, tagged)
        have = self.port_vlans(index)
        changed = {vid: flags for vid, flags in have.items() if want.get(vid) != flags}
        changed.update({vid: -1 for vid in want if vid not in have})
        try:
            for vid in sorted(v for v in have if v not in want):
                self._ip.vlan_filter("del", index=index, vlan_info={"vid": vid})
            for vid, flags in sorted(want.items()):
                if have.get(vid) != flags:
                    self._ip.vlan_filter("add", index=index, vlan_info={"vid": vid, "flags": flags})
        except netlink_error() as exc:
            raise kernel_error(_oserror(exc), f"setting the VLANs of port {index}") from None
        return changed

    def static_entries(self, bridge: int) -> set[tuple[int, str]]:
        """(port index, MAC) of every static FDB entry on bridge ``bridge``
        that points at a port: one dump, whatever the number of leases."""
        try:
            return {
                (int(entry["ifindex"]), str(entry.get("NDA_LLADDR")))
                for entry in self._ip.fdb("dump", master=bridge)
                if entry["state"] & NUD_NOARP and entry["ifindex"] != bridge
            }
        except netlink_error() as exc:
            raise kernel_error(_oserror(exc), f"listing the FDB of bridge {bridge}") from None
