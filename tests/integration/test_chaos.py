"""Chaos: clients of every behaviour while tapd is SIGKILLed and restarted at
random moments, then the lease list checked against the kernel and /proc.

The seed is printed; ``TAPD_CHAOS_SEED=N`` replays a run (the clients' own
choices and the kill schedule; the kernel's timing varies).  Who holds which
tap is read from ``/proc/PID/fdinfo`` (a tun fd's ``iff:`` line), never from
what clients say.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from livelog import events
from tapdtest import daemon_argv, links, wait_until

from tapd import client

CLIENTS = Path(__file__).resolve().parent.parent / "chaos_clients.py"
CONFIG = '[[allow]]\nusers = ["0", "65534"]\nbridges = ["br0"]\n'
WORKERS = 16
RESTARTS = 16


class Tapd:
    """tapd incarnations serving one listening socket the test keeps open
    (as systemd would): clients that connect while none runs wait in the
    backlog for the next."""

    def __init__(self, ns: str, workdir: Path) -> None:
        self.ns = ns
        self.workdir = workdir
        self.dir = tempfile.mkdtemp(prefix="tapd-chaos-")
        os.chmod(self.dir, 0o755)
        self.path = self.dir + "/s"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        os.chmod(self.path, 0o666)
        self.listener.listen(1024)
        (workdir / "tapd.toml").write_text(CONFIG)
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.runs += 1
        with open(self.workdir / f"tapd.{self.runs}.log", "wb") as log:
            args = ["--listen-fd", str(self.listener.fileno())]
            args += ["--config", str(self.workdir / "tapd.toml")]
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *daemon_argv(*args)],
                pass_fds=[self.listener.fileno()],
                stderr=log,
                stdin=subprocess.DEVNULL,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def log(self) -> list[dict[str, Any]]:
        return events(self.workdir / f"tapd.{self.runs}.log")

    def ready(self) -> bool:
        return any(e["event"] == "server.listening" for e in self.log())

    def leases(self) -> list[dict[str, Any]]:
        reply, _ = client.call({"op": "list"}, path=self.path)
        return list(reply["leases"])

    def fds(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self.dir)


def tap_holders(exclude: int) -> dict[str, set[int]]:
    """Tap name -> pids whose open tun fds are attached to it (fdinfo's
    ``iff:`` line: drivers/net/tun.c tun_chr_show_fdinfo)."""
    held: dict[str, set[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == exclude:
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    # "/dev/net/tun", or "/net/tun" when the tapd that opened
                    # it has died: its mount namespace is gone, and the path
                    # is then relative to the detached /dev mount.
                    if not os.readlink(f"/proc/{pid}/fd/{fd}").endswith("/net/tun"):
                        continue
                    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                        for line in f:
                            if line.startswith("iff:"):
                                name = line.split(":", 1)[1].strip()
                                if name:
                                    held.setdefault(name, set()).add(int(pid))
    return held


def uid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def violations(tapd: Tapd, ns: str) -> list[str]:
    """What is wrong now between tapd's lease list, the kernel and /proc."""
    assert tapd.proc is not None
    found = []
    leases = tapd.leases()
    devices = {
        name: link
        for name, link in links(ns).items()
        if link.get("linkinfo", {}).get("info_kind") == "tun"
    }
    holders = {k: v for k, v in tap_holders(tapd.proc.pid).items() if k in devices}
    by_name: dict[str, list[dict[str, Any]]] = {}
    for lease in leases:
        by_name.setdefault(lease["ifname"], []).append(lease)
    for name, pids in holders.items():
        listed = by_name.get(name, [])
        if len(listed) != 1:
            found.append(f"{name}, held by {sorted(pids)}, is listed {len(listed)} times")
        elif listed[0]["uid"] not in {uid_of(pid) for pid in pids}:
            found.append(f"{name} is listed for uid {listed[0]['uid']}, held by {sorted(pids)}")
    for name, link in devices.items():
        listed = by_name.get(name, [])
        if name not in holders and not any(alive(lease["pid"]) for lease in listed):
            found.append(f"{name} is left with nobody holding it (leases: {listed})")
        if not listed and link.get("master"):
            found.append(f"{name} is on {link['master']} without a lease")
    for lease in leases:
        link = devices.get(lease["ifname"])
        if link is None or link["ifindex"] != lease["ifindex"]:
            found.append(f"lease {lease['id']} names {lease['ifname']}, which is gone")
    return found


def steady_fds(tapd: Tapd) -> int:
    """tapd's fd count once it stops changing (a lease's pidfd closes just
    after the lease ends)."""
    counts = [tapd.fds()]
    while len(counts) < 5 or len(set(counts[-5:])) != 1:
        time.sleep(0.02)
        counts.append(tapd.fds())
    return counts[-1]


def test_chaos(ns: str, br0: str, tmp_path: Path) -> None:
    seed = int(os.environ.get("TAPD_CHAOS_SEED", random.randrange(1 << 32)))
    print(f"TAPD_CHAOS_SEED={seed}")
    rng = random.Random(seed)
    report = tmp_path / "report.jsonl"
    report.touch()
    os.chmod(report, 0o666)
    tapd = Tapd(ns, tmp_path)
    clients: subprocess.Popen[str] | None = None
    try:
        tapd.start()
        wait_until(tapd.ready, timeout=30, what="tapd to listen")
        grant = client.request_tap(path=tapd.path, br=br0)
        grant.close()
        wait_until(lambda: tapd.leases() == [], what="the warm-up lease to end")
        baseline = steady_fds(tapd)
        clients = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(CLIENTS),
             tapd.path, str(report), str(seed), str(WORKERS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert clients.stdin is not None and clients.stdout is not None
        assert clients.stdout.readline().strip() == "started"
        problems: list[str] = []

        def settled() -> bool:
            problems[:] = violations(tapd, ns)
            return not problems

        for round_ in range(RESTARTS):
            # Early (start-up, rebuilding leases), mid (serving a backlog) or late.
            low, high = rng.choice([(0.0, 0.4), (0.4, 1.0), (1.0, 2.5)])
            time.sleep(rng.uniform(low, high))
            tapd.kill()
            tapd.start()
            if round_ % 2 == 1:
                # Freeze every client around this restart's rebuild: nothing
                # changes but what tapd does, so it must come to agree with
                # the kernel (a lease whose owner lives would otherwise hide
                # a phantom until that owner exits).
                time.sleep(rng.uniform(0.3, 1.0))
                os.killpg(clients.pid, signal.SIGSTOP)
                try:
                    wait_until(tapd.ready, timeout=30, what="tapd to listen")
                    with contextlib.suppress(AssertionError):
                        wait_until(settled, timeout=10, what="the leases to match the kernel")
                    assert problems == [], f"seed {seed}, frozen after restart {round_}: {problems}"
                finally:
                    os.killpg(clients.pid, signal.SIGCONT)
        wait_until(tapd.ready, timeout=30, what="the last tapd to listen")
        clients.stdin.write("stop\n")
        clients.stdin.flush()
        assert clients.stdout.readline().strip() == "quiet"
        # Only the keep holders remain: tapd must agree with the kernel.
        with contextlib.suppress(AssertionError):
            wait_until(settled, timeout=15, what="the lease list to match the kernel")
        said = [json.loads(line) for line in report.read_text().splitlines()]
        bad = [x for x in said if x["kind"] == "violation"]
        grants = sum(x["kind"] == "grant" for x in said)
        errors = sum(x["kind"] == "error" for x in said)
        print(f"{grants} grants, {errors} requests cut by a restart, {tapd.runs} tapds")
        assert grants > 50, f"too few grants ({grants}) to mean anything (seed {seed})"
        assert problems == [] and bad == [], f"seed {seed}: {problems} {bad}"
        # Every client gone: nothing is left, and tapd's fds are back.
        clients.stdin.close()
        clients.wait(timeout=30)
        clients.stdout.close()
        clients = None
        wait_until(lambda: tapd.leases() == [], timeout=15, what="every lease to end")
        wait_until(
            lambda: (
                not any(
                    link.get("linkinfo", {}).get("info_kind") == "tun"
                    for link in links(ns).values()
                )
            ),
            timeout=15,
            what="every tap to go",
        )
        wait_until(lambda: tapd.fds() == baseline, timeout=10, what="tapd's fds to return")
    finally:
        if clients is not None:
            assert clients.stdin is not None and clients.stdout is not None
            clients.stdin.close()
            clients.wait(timeout=30)
            clients.stdout.close()
        tapd.close()
