"""The owner rule: a tap lives while its owner lives or while any process
holds one of its queues; once neither is true it goes (and a tap the client
made is given back instead).  While tapd runs and across its restarts."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import pytest
from fleet import Fleet, kill
from livelog import events
from tapdtest import Daemon, links, run_daemon, taps, wait_until


def _events(daemon: Daemon, lease: str) -> list[str]:
    return [e["event"] for e in events(daemon.log_path) if e.get("lease") == lease]


def _tun(ns: str, ifname: str) -> dict[str, object]:
    data: dict[str, object] = links(ns)[ifname]["linkinfo"]["info_data"]
    return data


@pytest.mark.parametrize("kind", ["handoff", "handoff-persist"])
@pytest.mark.parametrize("queues", [1, 2])
def test_a_tap_outlives_its_owner_while_a_child_holds_it(
    daemon: Daemon, kind: str, queues: int
) -> None:
    """libvirt's session daemon runs the helper (so owns the lease) and hands
    the fd to QEMU: its exit must not cut the running VM off."""
    with Fleet(daemon.socket_path, [kind], queues=queues) as fleet:
        (h,) = fleet.holders
        kill(h.pid)
        wait_until(
            lambda: (
                {"lease.kept", "lease.unpersisted"} & set(_events(daemon, h.lease))
                or h.ifname not in taps(daemon.ns)
            ),
            what="tapd to apply the owner rule",
        )
        assert h.ifname in taps(daemon.ns), "the tap was removed under its holder"
        # The VM's tap is untouched and its lease stays.
        assert links(daemon.ns)[h.ifname]["master"] == "br0"
        assert [x["id"] for x in daemon.leases()] == [h.lease]
        if queues > 1:
            # A multi-queue tap takes tapd's queue: its persistence is gone,
            # so it will go with its holder's last queue.
            assert _tun(daemon.ns, h.ifname)["persist"] is False
        # The holder goes: so do the tap and the lease.
        kill(h.holder)
        wait_until(lambda: h.ifname not in taps(daemon.ns), what="the tap to go")
        wait_until(lambda: daemon.leases() == [], what="the lease to end")
        assert "lease.ended" in _events(daemon, h.lease)


def test_a_persistent_tap_nobody_holds_goes_with_its_owner(daemon: Daemon) -> None:
    with Fleet(daemon.socket_path, ["persist"] * 3, queues=2) as fleet:
        for h in fleet.holders:
            assert _tun(daemon.ns, h.ifname)["persist"] is True
            kill(h.pid)
        wait_until(lambda: taps(daemon.ns) == [], what="the persistent taps to go")
        wait_until(lambda: daemon.leases() == [], what="the leases to end")


@pytest.mark.parametrize("kind", ["handoff", "handoff-persist"])
def test_the_owner_rule_holds_across_a_restart(
    ns: str, br0: str, tmp_path: Path, kind: str
) -> None:
    (tmp_path / "again").mkdir()
    with contextlib.ExitStack() as fleets:
        with run_daemon(ns, tmp_path) as first:
            fleet = fleets.enter_context(Fleet(first.socket_path, [kind, "persist"]))
            lone = fleets.enter_context(Fleet(first.socket_path, [kind]))
            (kept, persisted), (gone,) = fleet.holders, lone.holders
            first.stop(signal.SIGKILL)
        # While no tapd runs: every owner exits; one holder goes too.
        for h in (kept, persisted, gone):
            kill(h.pid)
        kill(gone.holder)
        with run_daemon(ns, tmp_path / "again") as second:
            # The held tap keeps its lease; the others go, whether the
            # persistence of the held one's child or the owner's own keeps them.
            wait_until(
                lambda: [x["id"] for x in second.leases()] == [kept.lease],
                what="only the held tap's lease",
            )
            wait_until(lambda: taps(ns) == [kept.ifname], what="only the held tap")
            assert links(ns)[kept.ifname]["master"] == "br0"
            kill(kept.holder)
            wait_until(lambda: taps(ns) == [], what="the held tap to go with its holder")
            wait_until(lambda: second.leases() == [], what="its lease to end")
