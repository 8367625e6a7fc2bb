"""Many lease owners at once, cheaply: one Python process forks them.

A holder started as its own interpreter costs ~0.25 s of CPU (the client's
imports); a forked one costs a fork.  :class:`Fleet` runs this file as a
script, which imports the client once and forks one child per holder; each
child asks tapd for a tap and then waits to be killed.  The test kills the
children it wants gone by pid, at the moment it chooses.

Kinds of holder (argv after the socket path, one word each):

* ``hold``: request a tap, hold its fd.
* ``persist``: request a tap, make it persistent (TUNSETPERSIST needs no
  privilege on a held fd), hold its fd.
* ``handoff``: request a tap, fork a child that keeps the fd, as libvirt
  hands the helper's fd to QEMU; the requester (the lease's owner) and the
  child can then be killed apart.
* ``handoff-persist``: the same, and the child makes the tap persistent.

Each child prints one JSON line: its ``kind``, ``pid`` (the owner), ``holder`` (the process
keeping the fd), ``ifname`` and ``lease``; the script prints ``ready`` once
all have.  When its stdin closes, it kills every process it made.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from tapd import client, tun


def _child(path: str, position: int, kind: str, out: int) -> None:
    try:
        options = json.loads(os.environ.get("FLEET_OPTIONS", "{}"))
        grant = client.request_tap(path=path, br="br0", **options)
    except Exception as exc:  # reported, and the test fails on it
        os.write(out, (json.dumps({"error": repr(exc)}) + "\n").encode())
        os._exit(1)
    fd = grant.tap_fds[0]
    holder = os.getpid()
    if kind == "persist":
        fcntl.ioctl(fd, tun.TUNSETPERSIST, 1)
    elif kind.startswith("handoff"):
        ready_r, ready_w = os.pipe()
        holder = os.fork()
        if holder == 0:
            if kind == "handoff-persist":
                fcntl.ioctl(fd, tun.TUNSETPERSIST, 1)
            os.close(ready_w)
            signal.pause()
            os._exit(0)
        os.close(ready_w)
        os.read(ready_r, 1)  # the holder is ready when it closes its end
        os.close(ready_r)
    line = {
        "position": position,
        "kind": kind,
        "pid": os.getpid(),
        "holder": holder,
        "ifname": grant.ifname,
    }
    line["lease"] = grant.reply["lease"]
    os.write(out, (json.dumps(line) + "\n").encode())
    signal.pause()
    os._exit(0)


def main(argv: list[str]) -> None:
    path, kinds = argv[0], argv[1:]
    # Children are reaped by the kernel: a killed owner must not linger as a
    # zombie (its pidfd says it exited either way, but /proc would not).
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    os.setpgid(0, 0)
    out = sys.stdout.fileno()
    for position, kind in enumerate(kinds):
        if os.fork() == 0:
            _child(path, position, kind, out)
    # One child at a time would be slower than tapd; all at once is a burst.
    # One write, like the children's lines: print() makes "forked" and its
    # newline two writes when stdout is unbuffered (PYTHONUNBUFFERED), and a
    # child's line can land between them.
    os.write(out, b"forked\n")
    sys.stdin.read()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGKILL)


@dataclass
class Holder:
    kind: str
    pid: int
    holder: int
    ifname: str
    lease: str


class Fleet:
    """``kinds`` holders against tapd at ``path``, in their own process group."""

    def __init__(self, path: str, kinds: list[str], **options: Any) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, path, *kinds],
            env={**os.environ, "FLEET_OPTIONS": json.dumps(options)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.holders: list[Holder] = []
        lines: list[dict[str, Any]] = []
        try:
            while len(lines) < len(kinds):
                line = self.proc.stdout.readline()
                assert line, "the fleet died"
                if line.strip() == "forked":
                    continue
                lines.append(json.loads(line))
                assert "error" not in lines[-1], lines[-1]
        except BaseException:
            self.close()
            raise
        # In the order of ``kinds`` (the children answer in any order).
        lines.sort(key=lambda x: int(x.pop("position")))
        self.holders = [Holder(**x) for x in lines]

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1:])
