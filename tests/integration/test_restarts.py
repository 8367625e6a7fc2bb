"""Leases across restarts of tapd while their taps come and go."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

from fleet import Fleet, kill
from livelog import events
from tapdtest import Daemon, ip, run_daemon, taps, wait_until


def _logged(daemon: Daemon, event: str) -> bool:
    """Whether tapd logged ``event`` (read while it writes: a last line
    may be half there)."""
    return any(e["event"] == event for e in events(daemon.log_path))


def test_taps_removed_while_a_restarted_tapd_rebuilds_its_leases_leave_no_lease(
    ns: str, br0: str, tmp_path: Path
) -> None:
    """Issue 12's reproduction: holders exiting while tapd rebuilds its leases
    left phantom leases (listed, counted, never ended, no downscript)."""
    out = tmp_path / "down.out"
    down = tmp_path / "down.sh"
    down.write_text(f'#!/bin/sh\necho "$1" >> {out}\n')
    down.chmod(0o755)
    config = f'[programs]\nhooks = {{ down = "{down}" }}\n'
    (tmp_path / "again").mkdir()
    with contextlib.ExitStack() as fleets:
        with run_daemon(ns, tmp_path, config) as first:
            # Persistent taps whose owners die while tapd is down: the restart
            # removes each, one kernel round trip at a time, which keeps the
            # rebuild busy while the second fleet dies.
            early = fleets.enter_context(
                Fleet(first.socket_path, ["persist"] * 30, downscript="down")
            )
            late = fleets.enter_context(Fleet(first.socket_path, ["hold"] * 60, downscript="down"))
            named = {h.ifname for h in early.holders + late.holders}
            first.stop(signal.SIGKILL)
        for h in early.holders:
            kill(h.pid)
        with run_daemon(ns, tmp_path / "again", config) as second:
            # The rebuild has listed the taps (it reports a gone owner only
            # after the dump): now every other holder exits.
            deadline = time.monotonic() + 30
            while not _logged(second, "lease.owner.gone"):
                assert time.monotonic() < deadline, "the restart never reached its rebuild"
                time.sleep(0.001)
            for h in late.holders:
                kill(h.pid)
            wait_until(lambda: not named & set(taps(ns)), timeout=30, what="every tap to go")
            wait_until(lambda: _logged(second, "lease.reconciled"), what="the rebuild to end")
            with contextlib.suppress(AssertionError):
                wait_until(lambda: second.leases() == [], timeout=10, what="leases to end")
            phantoms = second.leases()
            assert phantoms == [], f"{len(phantoms)} phantom leases"
            wait_until(
                lambda: out.exists() and len(out.read_text().split()) == len(named),
                timeout=10,
                what="a downscript for every lease",
            )
            assert sorted(out.read_text().split()) == sorted(named)


def test_a_tap_whose_bridge_goes_keeps_its_lease(daemon: Daemon) -> None:
    """A port leaving a bridge makes the bridge announce an RTM_DELLINK (in
    AF_BRIDGE) for it: the tap lives on, and so must its lease."""
    grant = daemon.request(br="br0")
    try:
        ip("-n", daemon.ns, "link", "add", "br1", "type", "bridge")
        ip("-n", daemon.ns, "link", "set", "br1", "up")
        ip("-n", daemon.ns, "link", "del", "br0")
        # Events arrive in order: once a later tap's end is seen, br0's are.
        daemon.request(br="br1").close()
        wait_until(
            lambda: all(x["bridge"] != "br1" for x in daemon.leases()),
            what="the br1 tap's lease to end",
        )
        assert [x["id"] for x in daemon.leases()] == [grant.reply["lease"]]
        assert grant.ifname in taps(daemon.ns)
    finally:
        grant.close()
    wait_until(lambda: daemon.leases() == [], what="the lease to end with its tap")


def test_link_events_lost_in_an_overrun_end_no_lease_wrongly_and_miss_none(
    daemon: Daemon,
) -> None:
    """The kernel drops events when tapd's socket is full (ENOBUFS): tapd
    then looks at the kernel again, and ends up where the events would have
    taken it."""
    ns = daemon.ns
    ip("-n", ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    with Fleet(daemon.socket_path, ["hold", "handoff", "handoff-persist", "hold"]) as fleet:
        plain, handoff, persisted, stays = fleet.holders
        kill(handoff.pid)
        kill(persisted.pid)
        wait_until(
            lambda: all(_logged_for(daemon, "lease.kept", h.lease) for h in (handoff, persisted)),
            what="tapd to keep the held orphans",
        )
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            # Each "up" of a veth whose peer is down is an up link without
            # carrier, which tapd's filter passes: enough to fill its socket.
            flood = "link set va up\nlink set va down\n" * 10_000
            subprocess.run(["ip", "-n", ns, "-batch", "-"], input=flood, text=True, check=True)
            # Now their events are lost: a plain tap's end, an orphan's end
            # (non-persistent: RTM_DELLINK) and an orphan's last queue (persistent:
            # only its carrier says so).
            for pid in (plain.pid, handoff.holder, persisted.holder):
                kill(pid)
            wait_until(
                lambda: not {plain.ifname, handoff.ifname} & set(taps(ns)),
                what="the kernel to remove the non-persistent taps",
            )
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: _logged(daemon, "link.events.overrun"), what="the overrun")
        wait_until(
            lambda: [x["id"] for x in daemon.leases()] == [stays.lease],
            what="only the live holder's lease",
        )
        wait_until(lambda: taps(ns) == [stays.ifname], what="only the live holder's tap")


def _logged_for(daemon: Daemon, event: str, lease: str) -> bool:
    lines = daemon.log_path.read_text().split("\n")[:-1]
    return any(
        e["event"] == event and e.get("lease") == lease
        for e in map(json.loads, filter(None, lines))
    )
