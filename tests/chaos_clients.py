"""Clients of every behaviour at once, for the chaos test (run as a script
inside the test's network namespace: ``chaos_clients.py SOCKET REPORT SEED
WORKERS``).

Each worker is a forked process that loops over behaviours drawn from its
own seeded random stream until it is told to stop (SIGUSR1 to the group):

* ``hold``: the worker itself asks, holds 0.05-2 s, closes.
* ``exit-holding``: a child asks, holds a while, exits with the fd open.
* ``persist-exit``: a child asks, makes the tap persistent, exits.
* ``vanish``: a child sends a request and exits without reading the reply
  (or mid-line).
* ``other-uid``: a child drops to uid/gid 65534, asks, holds, exits.
* ``handoff``: a child asks, forks a grandchild that keeps the fd (and
  sometimes makes the tap persistent) for a while, and exits at once: the
  lease's owner is gone while its tap is in use, as with libvirt.
* ``keep``: a child asks and holds until the very end (a few per worker).
* ``burst``: eight children ask at once and exit.

Whatever a client sees is appended to REPORT as one JSON line: ``grant``
(after checking that the tap is what was promised: its fd is a tap of that
name, up, on br0), ``error`` (tapd went away mid-request: expected), and
``violation`` (a grant that was not a working tap on the bridge, or a tap
removed while its holder still used it).  The driver prints ``quiet`` once
every transient process is done after a stop; closing its stdin then kills
every process it made (``keep`` holders included).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import random
import signal
import socket
import sys
import time

from tapd import client, tun
from tapd.errors import TapdError

#: <linux/prctl.h>: orphaned grandchildren are reparented to the driver,
#: so that it can wait for them
PR_SET_CHILD_SUBREAPER = 36
NOBODY = 65534
IFF_UP = 0x1

_report = -1
_stopping = False


def _say(kind: str, **fields: object) -> None:
    os.write(_report, (json.dumps({"kind": kind, "pid": os.getpid(), **fields}) + "\n").encode())


def _working(grant: client.TapGrant) -> None:
    """The grant is a tap of the name promised, up, on br0 (else a violation)."""
    name = grant.ifname
    try:
        info = tun.tap_info(grant.tap_fds[0])
        master = os.path.basename(os.readlink(f"/sys/class/net/{name}/master"))
        with open(f"/sys/class/net/{name}/flags") as f:
            up = bool(int(f.read(), 16) & IFF_UP)
    except (OSError, TapdError) as exc:
        _say("violation", what="grant is not a working tap", ifname=name, error=repr(exc))
        return
    if info.name != name or not info.is_tap or master != "br0" or not up:
        _say("violation", what="grant is not a working tap", ifname=name, master=master, up=up)
        return
    _say("grant", ifname=name, lease=grant.reply["lease"])


def _still_attached(grant: client.TapGrant) -> None:
    """Before letting go: nobody removed the tap while it was in use."""
    try:
        tun.tap_info(grant.tap_fds[0])
    except Exception as exc:
        _say("violation", what="tap removed under its holder", ifname=grant.ifname, error=repr(exc))


def _ask(path: str) -> client.TapGrant | None:
    try:
        grant = client.request_tap(path=path, br="br0")
    except (client.ClientError, OSError) as exc:
        _say("error", error=repr(exc))
        return None
    _working(grant)
    return grant


def _in_child(fn: object, *args: object) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            fn(*args)  # type: ignore[operator]
        finally:
            os._exit(0)
    return pid


def _hold(path: str, rng: random.Random, low: float = 0.05, high: float = 2.0) -> None:
    grant = _ask(path)
    if grant is None:
        return
    time.sleep(rng.uniform(low, high))
    _still_attached(grant)
    grant.close()


def _exit_holding(path: str, rng: random.Random) -> None:
    grant = _ask(path)
    if grant is not None:
        time.sleep(rng.uniform(0.05, 1.0))
        _still_attached(grant)
    # exits with the fd open


def _persist_exit(path: str, rng: random.Random) -> None:
    grant = _ask(path)
    if grant is not None:
        fcntl.ioctl(grant.tap_fds[0], tun.TUNSETPERSIST, 1)


def _vanish(path: str, rng: random.Random) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
            line = b'{"op": "request", "br": "br0"}\n'
            sock.sendall(line if rng.random() < 0.7 else line[: rng.randrange(1, len(line))])
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0, 0.05))
        except OSError:
            pass
    os._exit(0)


def _other_uid(path: str, rng: random.Random) -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    _hold(path, rng, 0.05, 1.0)


def _handoff(path: str, rng: random.Random) -> None:
    grant = _ask(path)
    if grant is None:
        return
    persist = rng.random() < 0.5
    hold = rng.uniform(0.05, 2.0)
    if os.fork() == 0:
        if persist:
            fcntl.ioctl(grant.tap_fds[0], tun.TUNSETPERSIST, 1)
        time.sleep(hold)
        _still_attached(grant)
        os._exit(0)
    # the owner exits at once; the grandchild keeps the tap


def _keep(path: str, rng: random.Random) -> None:
    grant = _ask(path)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    while grant is not None:
        signal.pause()


def _burst(path: str, rng: random.Random) -> list[int]:
    return [_in_child(_exit_holding, path, random.Random(rng.random())) for _ in range(8)]


BEHAVIOURS = {
    "hold": 4,
    "exit-holding": 3,
    "persist-exit": 2,
    "vanish": 2,
    "other-uid": 2,
    "handoff": 3,
    "keep": 1,
    "burst": 1,
}


def _worker(path: str, seed: int) -> None:
    rng = random.Random(seed)
    names, weights = list(BEHAVIOURS), list(BEHAVIOURS.values())
    keeps = 0
    while not _stopping:
        kind = rng.choices(names, weights)[0]
        child_rng = random.Random(rng.random())
        if kind == "hold":
            _hold(path, child_rng)
            continue
        if kind == "keep":
            keeps += 1
            if keeps > 2:
                continue
            _in_child(_keep, path, child_rng)  # not waited for: it stays
            continue
        if kind == "burst":
            pids = _burst(path, child_rng)
        else:
            fn = {
                "exit-holding": _exit_holding,
                "persist-exit": _persist_exit,
                "vanish": _vanish,
                "other-uid": _other_uid,
                "handoff": _handoff,
            }[kind]
            pids = [_in_child(fn, path, child_rng)]
        for pid in pids:
            _wait(pid)


def _wait(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except InterruptedError:
            continue
        except ChildProcessError:
            return


def _stop(*_: object) -> None:
    global _stopping
    _stopping = True


def main(argv: list[str]) -> None:
    global _report
    path, report, seed, workers = argv[0], argv[1], int(argv[2]), int(argv[3])
    _report = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    os.setpgid(0, 0)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGUSR1, _stop)
    pids = set()
    for n in range(workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGUSR1, _stop)
            _worker(path, seed * 1000 + n)
            os._exit(0)
        pids.add(pid)
    print("started", flush=True)
    sys.stdin.readline()  # "stop"
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    # Every transient process (workers, their children, orphaned grandchildren
    # reparented here) ends on its own; the keep holders do not.
    keepers = _keepers()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if set(_children()) <= keepers | _keepers():
                break
            time.sleep(0.02)
    print("quiet", flush=True)
    sys.stdin.read()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGKILL)


def _children() -> list[int]:
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == me and fields[0] != "Z":
            found.append(int(entry))
    return found


def _keepers() -> set[int]:
    """Children paused in ``keep`` (they ignore SIGUSR1 and sleep forever)."""
    found = set()
    for pid in _children():
        try:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
        except OSError:
            continue
        ignored = int(status.split("SigIgn:")[1].split()[0], 16)
        if ignored & (1 << (signal.SIGUSR1 - 1)):
            found.add(pid)
    return found


if __name__ == "__main__":
    main(sys.argv[1:])
