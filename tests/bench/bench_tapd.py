"""tapd's benchmark: per-tap cost against qemu-bridge-helper and the kernel's own.

Run as root from the repository:  python tests/bench/bench_tapd.py [--json FILE]

It makes network namespaces of its own (never touching the host's interfaces),
starts tapd in them, and measures, interleaved in rounds so that machine noise
hits every contender alike:

1. the kernel floor: in-process open + TUNSETIFF + one hand-packed
   RTM_NEWLINK setting master, MTU, address and up (the least the kernel can
   do for a bridged tap); beside it, a bare trio server doing only those
   syscalls per connection, for what any Python/trio daemon adds to them;
2. qemu-bridge-helper (Debian's QEMU), per tap, through its real protocol;
3. tapd, per tap, from a separate client process (connect -> reply -> fd);
4. throughput: 64 concurrent clients, 2,000 taps, tapd against the helper
   run 64 at a time;
5. a 256-queue request against its kernel floor;
6. tapd's latency beyond the floor with 0, 250, 500 and 1000 live leases;
7. tapd's RSS and open fds at 1000 leases, and the cold start to a first
   reply under socket activation, beside its floor: the same interpreter
   importing trio and structlog and answering once a pydantic model has
   validated the request;
8. the user's path, whole processes in the rounds of 1-3: tapd-bridge-helper
   through QEMU's helper protocol (beside qemu-bridge-helper's, which is 2),
   ``tapctl request --br BR -- /bin/true``, and a bare ``python -c pass`` of
   the same interpreter, the floor of any Python entry point;
9. 64 VM starts at once through each helper, the way a host boots its VMs,
   and 64 bare ``python -c pass`` at once, the floor of a Python helper.

It measures tapd as users install it: it first installs the checkout with
``pip install .`` (not editable: an editable install's import finder costs
every interpreter ~10 ms and so hides what the entry points cost) into a venv
of /usr/bin/python3's (``--venv``, default /var/tmp/tapd-bench-venv, reused
and reinstalled each run), and runs itself again with that venv's Python,
so every process it starts (daemon, clients, console scripts) is the
installed tapd, byte-compiled by pip.

The cold start runs first, and each later phase starts once the kernel has
finished with the last one's taps (quiesce()).  Every tap is held until its
phase ends (a bridge takes 1023 ports, so taps spread over several
bridges), and each phase with many taps runs in a namespace of its own that
is deleted whole: the kernel tears down a namespace's devices in one batch,
where closing 2,000 fds one by one would cost a minute of RCU grace periods.
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: set (to the venv) in the run that measures a non-editable install
INSTALLED = "TAPD_BENCH_VENV" in os.environ
#: where the agents and the bare server find tapd: the installed package, or
#: in a run of the checkout's own source, the checkout
TAPD_PATH = "" if INSTALLED else str(REPO)
HELPER = "/usr/lib/qemu/qemu-bridge-helper"
BRIDGE_CONF = Path("/etc/qemu/bridge.conf")
BRIDGES = ("br0", "br1", "br2", "br3")

# <linux/if_tun.h>, <linux/rtnetlink.h>, <linux/if_link.h> for the floor
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE, IFF_TUN_EXCL = 2, 0x1000, 0x4000, 0x100, 0x8000
RTM_NEWLINK, NLM_F_REQUEST, NLM_F_ACK = 16, 1, 4
IFLA_ADDRESS, IFLA_MTU, IFLA_MASTER = 1, 4, 10


# -- helpers ---------------------------------------------------------------------------


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def namespace(bridges: int = len(BRIDGES)) -> Iterator[str]:
    """A fresh netns with bridges br0.., deleted (with every device) on exit."""
    name = "tapd-bench-" + os.urandom(3).hex()
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        for br in BRIDGES[:bridges]:
            ip("-n", name, "link", "add", br, "type", "bridge")
            ip("-n", name, "link", "set", br, "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def in_ns(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def in_turn(kinds: list[str], r: int) -> list[str]:
    """``kinds`` with the ``r``-th opening round ``r``: whichever goes first
    after a close meets the kernel's clean-up of the last round's taps, so
    each contender takes that place in turn."""
    first = r % len(kinds)
    return kinds[first:] + kinds[:first]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Series:
    name: str
    values: list[float] = field(default_factory=list)  # seconds

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def p99(self) -> float:
        return pct(self.values, 0.99)


# -- the in-namespace agent -------------------------------------------------------------
#
# Everything that must run inside a namespace (the floor, the helper, tapd's
# clients) runs in one agent process started there, driven over stdin/stdout
# with one JSON command per line.

FLOOR = r'''
import fcntl, json, os, socket, struct, subprocess, sys, time, array, threading
if sys.argv[1]:
    sys.path.insert(0, sys.argv[1])

TUNSETIFF = 0x400454CA
held = []
seq = [0]
nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
nl.bind((0, 0))

def setlink(index, master, mtu, mac):
    """One RTM_NEWLINK: ifinfomsg + IFLA_ADDRESS, IFLA_MTU, IFLA_MASTER, IFF_UP."""
    seq[0] += 1
    attrs = struct.pack("=HH6sxx", 10, 1, mac) + struct.pack("=HHI", 8, 4, mtu) \
        + struct.pack("=HHi", 8, 10, master)
    body = struct.pack("=BxHiII", 0, 0, index, 1, 1) + attrs
    nl.send(struct.pack("=IHHII", 16 + len(body), 16, 5, seq[0], 0) + body)
    data = nl.recv(4096)
    err = struct.unpack_from("=i", data, 16)[0]
    if err:
        raise OSError(-err, os.strerror(-err))

def floor_one(name, br, queues=1, keep=True):
    flags = 0x2 | 0x1000 | 0x4000 | (0x100 if queues > 1 else 0)
    fds = []
    for q in range(queues):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        fds.append(fd)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                    flags | (0x8000 if q == 0 else 0)))
    setlink(socket.if_nametoindex(name), socket.if_nametoindex(br), 1500,
            b"\xfe" + os.urandom(5))
    if not keep:
        return fds[0]
    held.extend(fds)
'''

AGENT = (
    FLOOR
    + r"""
from tapd import client, fdpass

BIN = os.path.dirname(sys.executable)

def helper_one(br, helper="/usr/lib/qemu/qemu-bridge-helper", env=None):
    # QEMU's net_bridge_run_helper(): the helper on a socketpair, one byte
    # with the tap fd back, then its exit.
    a, b = socket.socketpair()
    p = subprocess.Popen([helper, "--use-vnet", f"--fd={b.fileno()}", f"--br={br}"],
                         pass_fds=[b.fileno()], env=env)
    b.close()
    got = fdpass.recv_sync(a, 1)
    a.close()
    if p.wait() != 0 or len(got.fds) != 1:
        raise RuntimeError("helper failed")
    held.extend(got.fds)

def tapd_one(path, br, queues=1):
    g = client.request_tap(path=path, br=br, queues=queues if queues > 1 else None)
    held.extend(g.tap_fds)

def run_one(argv):
    if subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).returncode:
        raise RuntimeError(f"{argv} failed")

n = [0]
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    if op == "close":
        for fd in held:
            os.close(fd)
        held.clear()
        print(json.dumps([]), flush=True)
        continue
    if op == "quit":
        break
    out = []
    for i in range(cmd["count"]):
        br = cmd["bridges"][i % len(cmd["bridges"])]
        t = time.perf_counter()
        if op == "floor":
            n[0] += 1
            floor_one(f"fl{os.getpid() % 10000}x{n[0]}", br, cmd.get("queues", 1))
        elif op == "helper":
            helper_one(br)
        elif op == "tapd":
            tapd_one(cmd["path"], br, cmd.get("queues", 1))
        elif op == "removal":
            n[0] += 1
            fd = floor_one(f"rm{os.getpid() % 10000}x{n[0]}", br, keep=False)
            t = time.perf_counter()
            os.close(fd)  # the last fd: the kernel removes the tap before close returns
        elif op == "tapd-bridge-helper":
            helper_one(br, f"{BIN}/tapd-bridge-helper", {"TAPD_SOCKET": cmd["path"]})
        elif op == "tapctl":
            run_one([f"{BIN}/tapctl", "--socket", cmd["path"], "request", "--br", br,
                     "--", "/bin/true"])
        elif op == "python":
            run_one([sys.executable, "-c", "pass"])
        out.append(time.perf_counter() - t)
    print(json.dumps(out), flush=True)
"""
)


# The least any trio daemon adds to the floor: a bare server that, per
# connection, reads one line, does exactly the floor's syscalls on the loop
# and sends the fd back - no validation, policy, lease or log.  tapd's cost
# above this is tapd's own; this one's above the floor is Python's and trio's.
BARE = (
    FLOOR
    + r"""
import trio
n = [0]
async def serve_one(conn):
    with conn:
        while True:
            try:
                data = conn.recv(65536)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(conn)
        n[0] += 1
        fd = floor_one(f"bs{n[0]}", json.loads(data)["br"], keep=False)
        conn.sendmsg([b'{"ok":true,"fds":1,"vhostfds":0}\n'],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])
        os.close(fd)
async def main():
    listener = socket.socket(fileno=int(sys.argv[2]))
    listener.setblocking(False)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            conn.setblocking(False)
            nursery.start_soon(serve_one, conn)
trio.run(main)
"""
)


class Agent:
    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen(
            in_ns(ns, [sys.executable, "-c", AGENT, TAPD_PATH]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, **cmd: object) -> list[float]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent died on {cmd}")
        return list(json.loads(line))

    def quit(self) -> None:
        assert self.proc.stdin and self.proc.stdout
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()


@dataclass
class Tapd:
    proc: subprocess.Popen[bytes]
    path: str
    workdir: str

    @classmethod
    def start(cls, ns: str, config: str = "", bare: bool = False) -> Tapd:
        """tapd on a socket of its own; ``bare``: the bare trio server instead."""
        workdir = tempfile.mkdtemp(prefix="tapd-bench-")
        path = f"{workdir}/s"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1024)
        (Path(workdir) / "tapd.toml").write_text(config)
        fd = str(listener.fileno())
        argv = (
            ["-c", BARE, TAPD_PATH, fd]
            if bare
            else ["-m", "tapd.daemon", "--listen-fd", fd, "--config", f"{workdir}/tapd.toml"]
        )
        proc = subprocess.Popen(
            in_ns(ns, [sys.executable, *argv]),
            pass_fds=[listener.fileno()], stderr=subprocess.DEVNULL,
            cwd=workdir if INSTALLED else REPO,
        )  # fmt: skip
        listener.close()
        return cls(proc, path, workdir)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def rss_and_fds(self) -> tuple[int, int]:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        return rss * 1024, len(os.listdir(f"/proc/{self.proc.pid}/fd"))


@contextlib.contextmanager
def helper_acl() -> Iterator[None]:
    """qemu-bridge-helper reads its ACL from a compiled-in path."""
    saved = BRIDGE_CONF.read_bytes() if BRIDGE_CONF.exists() else None
    BRIDGE_CONF.parent.mkdir(exist_ok=True)
    BRIDGE_CONF.write_text("".join(f"allow {br}\n" for br in BRIDGES))
    try:
        yield
    finally:
        if saved is None:
            BRIDGE_CONF.unlink()
        else:
            BRIDGE_CONF.write_bytes(saved)


def _idle_jiffies() -> tuple[int, int]:
    """(idle, total) CPU time so far, from /proc/stat's first line."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


def quiesce(limit: float = 120.0) -> None:
    """Wait for the kernel to finish with the last phase's taps.

    Thousands of devices going (a namespace deleted, an agent's fds closed
    at exit) leave kernel workers busy for a while after the call returns,
    holding RTNL in stretches and taking CPU.  The next phase would pay for
    that, so wait until the CPUs are 90% idle over three windows of 0.2 s in
    a row and an RTNL-taking change in a namespace of our own is quick.
    """
    with namespace(bridges=0) as probe:
        deadline = time.monotonic() + limit
        calm = 0
        while calm < 3 and time.monotonic() < deadline:
            idle, total = _idle_jiffies()
            time.sleep(0.2)
            start = time.perf_counter()
            ip("-n", probe, "link", "set", "lo", "mtu", str(65536 - calm))
            quick = time.perf_counter() - start < 0.02
            idle2, total2 = _idle_jiffies()
            busy = 1 - (idle2 - idle) / max(1, total2 - total)
            calm = calm + 1 if quick and busy < 0.1 else 0


# -- the phases -------------------------------------------------------------------------


#: 8: the user's entry points as whole processes, by row name -> agent op
PROCESSES = {
    "tapd-bridge-helper": "tapd-bridge-helper",
    "tapctl request -- true": "tapctl",
    "python -c pass": "python",
}
#: what the kernel takes to remove a bridged tap when its last fd closes: a
#: process that exits holding one (true, under tapctl) waits for it
REMOVAL = "removal (last close)"


def per_tap(rounds: int, per_round: int) -> dict[str, Series]:
    """1-3 and 8: floor, bare trio server, helper and tapd per tap, and the
    user's entry points as whole processes, interleaved round by round."""
    names = ("floor", "bare trio", "helper", "tapd", REMOVAL, *PROCESSES)
    series = {k: Series(k) for k in names}
    ops = {**PROCESSES, REMOVAL: "removal"}
    with namespace() as ns:
        tapd, bare = Tapd.start(ns), Tapd.start(ns, bare=True)
        agent = Agent(ns)
        paths = {"tapd": tapd.path, "bare trio": bare.path}
        try:
            for path in paths.values():  # warm up
                agent.run(op="tapd", path=path, count=3, bridges=["br0"])
            for op in PROCESSES.values():
                agent.run(op=op, path=tapd.path, count=2, bridges=["br0"])
            agent.run(op="close")
            settle(tapd.path, 0)
            kinds = list(series)
            for r in range(rounds):
                for kind in in_turn(kinds, r):
                    series[kind].values += agent.run(
                        op="tapd" if kind in paths else ops.get(kind, kind),
                        path=paths.get(kind, tapd.path),
                        count=per_round,
                        bridges=list(BRIDGES),
                    )
                agent.run(op="close")
                settle(tapd.path, 0)
        finally:
            agent.quit()
            tapd.stop()
            bare.stop()
    return series


def _burst(kind: str, agents: list[Agent], path: str, total: int) -> float:
    """Seconds for ``agents`` to get ``total`` taps at once, each its share."""
    shares = [total // len(agents) + (i < total % len(agents)) for i in range(len(agents))]
    barrier = threading.Barrier(len(agents) + 1)

    def go(i: int) -> None:
        barrier.wait()
        agents[i].run(op=kind, path=path, count=shares[i], bridges=[BRIDGES[i % len(BRIDGES)]])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(agents))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def throughput(total: int, clients: int) -> dict[str, float]:
    """4: taps per second with ``clients`` at once, ``total`` taps in all."""
    result: dict[str, float] = {}
    for kind in ("helper", "tapd"):
        with namespace() as ns:
            tapd = Tapd.start(ns) if kind == "tapd" else None
            agents = [Agent(ns) for _ in range(clients)]
            try:
                path = tapd.path if tapd is not None else ""
                if tapd is not None:  # the first request pays tapd's lazy start-up
                    agents[0].run(op="tapd", path=path, count=1, bridges=["br0"])
                result[kind] = total / _burst(kind, agents, path, total)
            finally:
                for agent in agents:
                    agent.quit()
                if tapd is not None:
                    tapd.stop()
    return result


def vm_starts(rounds: int, clients: int) -> dict[str, Series]:
    """9: ``clients`` VM starts at once through each helper, whole processes:
    the seconds until the last has its tap, each helper in turn, ``rounds``
    times; and as many bare ``python -c pass`` at once, the floor of any
    helper written in Python."""
    series = {k: Series(k) for k in ("helper", "tapd-bridge-helper", "python")}
    with namespace() as ns:
        tapd = Tapd.start(ns)
        agents = [Agent(ns) for _ in range(clients)]
        try:
            agents[0].run(op="tapd-bridge-helper", path=tapd.path, count=1, bridges=["br0"])
            agents[0].run(op="close")
            kinds = list(series)
            for r in range(rounds):
                for kind in in_turn(kinds, r):
                    series[kind].values.append(_burst(kind, agents, tapd.path, clients))
                    for agent in agents:
                        agent.run(op="close")
                    settle(tapd.path, 0)
        finally:
            for agent in agents:
                agent.quit()
            tapd.stop()
    return series


def multiqueue(rounds: int) -> dict[str, Series]:
    """5: one 256-queue tap, tapd against its floor."""
    series = {k: Series(f"256q {k}") for k in ("floor", "tapd")}
    with namespace(1) as ns:
        tapd = Tapd.start(ns)
        agent = Agent(ns)
        try:
            agent.run(op="tapd", path=tapd.path, count=1, bridges=["br0"])
            agent.run(op="close")
            for _ in range(rounds):
                for kind in ("floor", "tapd"):
                    series[kind].values += agent.run(
                        op=kind, path=tapd.path, count=1, bridges=["br0"], queues=256
                    )
                    agent.run(op="close")
        finally:
            agent.quit()
            tapd.stop()
    return series


def settle(path: str, leases: int) -> None:
    """Wait until tapd has seen the taps just closed go (its lease count back
    at ``leases``), so that one round's clean-up does not fall in the next."""
    if not INSTALLED:
        sys.path.insert(0, str(REPO))
    from tapd import client

    deadline = time.monotonic() + 10
    while client.status(path=path)["leases"] > leases and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)


def scaling(
    levels: list[int], per_level: int
) -> tuple[dict[int, dict[str, Series]], dict[str, int]]:
    """6 and 7: latency beyond the floor as leases grow; RSS and fds at the top."""
    out: dict[int, dict[str, Series]] = {}
    footprint: dict[str, int] = {}
    with namespace() as ns:
        tapd = Tapd.start(ns)
        filler, agent = Agent(ns), Agent(ns)
        try:
            agent.run(op="tapd", path=tapd.path, count=2, bridges=["br0"])
            agent.run(op="close")
            live = 0
            for level in levels:
                filler.run(op="tapd", path=tapd.path, count=level - live, bridges=list(BRIDGES))
                live = level
                out[level] = {k: Series(f"{k}@{level}") for k in ("floor", "tapd")}
                for i in range(4):
                    for kind in in_turn(["floor", "tapd"], i):
                        out[level][kind].values += agent.run(
                            op=kind, path=tapd.path, count=per_level // 4, bridges=list(BRIDGES)
                        )
                    agent.run(op="close")
                    settle(tapd.path, level)
            rss, fds = tapd.rss_and_fds()
            footprint = {"leases": live, "rss_bytes": rss, "open_fds": fds}
        finally:
            filler.quit()
            agent.quit()
            tapd.stop()
    return out, footprint


#: the cold start's floor: the same interpreter, socket-activated the same way,
#: importing the libraries the design fixes (trio, pydantic, structlog), and
#: answering the first connection once a pydantic model has validated its
#: line - what any daemon built on them pays before its first reply (pydantic
#: loads most of itself only when a first model is defined)
STACK = r"""
import socket, structlog, trio
from pydantic import BaseModel
class Request(BaseModel):
    op: str
conn, _ = socket.socket(fileno=3).accept()
Request.model_validate_json(conn.recv(4096))
conn.sendall(b'{"ok": true}\n')
"""


def cold_start(rounds: int) -> dict[str, Series]:
    """7: socket activation to a first reply (python start-up included): the
    reply to a VMM's first request, its tap in hand; beside it, interleaved,
    :data:`STACK`'s reply, the floor."""
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate (Debian's systemd) is needed"
    series = {k: Series(k) for k in ("tapd", "stack")}
    argv = {"tapd": ["-m", "tapd.daemon"], "stack": ["-c", STACK]}
    with namespace(1) as ns:
        for r in range(rounds):
            for kind in in_turn(list(series), r):
                took = _cold_start_once(ns, activate, argv[kind], tap=kind == "tapd")
                series[kind].values.append(took)
    return series


def _cold_start_once(ns: str, activate: str, argv: list[str], tap: bool) -> float:
    workdir = tempfile.mkdtemp(prefix="tapd-bench-")
    path = f"{workdir}/s"
    proc = subprocess.Popen(
        in_ns(ns, [activate, "-l", path, sys.executable, *argv]),
        stderr=subprocess.DEVNULL, cwd=workdir if INSTALLED else REPO,
    )  # fmt: skip
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:  # the socket file exists a moment before listen()
        try:
            sock.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.002)
    # systemd-socket-activate starts the program on this first connection.
    start = time.perf_counter()
    sock.sendall(b'{"op": "request", "br": "br0"}\n')
    _, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(4))
    took = time.perf_counter() - start
    assert ancdata or not tap, "tapd sent no fd"
    for _, _, data in ancdata:
        os.close(int.from_bytes(data[:4], sys.byteorder))
    sock.close()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    shutil.rmtree(workdir, ignore_errors=True)
    return took


# -- report -----------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.3f}"


def run_installed(venv: Path) -> int:
    """Install the checkout into ``venv`` as the README does (not editable)
    and run this benchmark again with its Python."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    # --force-reinstall: the checkout's code as it is now, under the same version
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, str(REPO)], check=True)  # tapd's dependencies
    subprocess.run([*pip, "--no-deps", "--force-reinstall", str(REPO)], check=True)
    env = {**os.environ, "TAPD_BENCH_VENV": str(venv)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    print(f"bench_tapd: measuring {REPO} as installed in {venv} (pip install .)", flush=True)
    return subprocess.run([str(python), __file__, *sys.argv[1:]], env=env).returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--per-round", type=int, default=40)
    p.add_argument("--total", type=int, default=2000, help="taps in the throughput phase")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    p.add_argument(
        "--venv", default="/var/tmp/tapd-bench-venv",
        help="the venv to install the checkout into (pip install ., not editable)",
    )  # fmt: skip
    p.add_argument(
        "--source", action="store_true",
        help="measure the checkout's source as this Python imports it, not an install",
    )  # fmt: skip
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench_tapd: run as root (it makes namespaces, bridges and taps)", file=sys.stderr)
        return 2
    if not INSTALLED and not args.source:
        return run_installed(Path(args.venv))
    scripts = [Path(sys.executable).parent / name for name in ("tapctl", "tapd-bridge-helper")]
    if not all(os.access(script, os.X_OK) for script in scripts):
        print(f"bench_tapd: run it with the Python of tapd's venv ({scripts[0].parent} "
              "has no tapctl/tapd-bridge-helper)", file=sys.stderr)  # fmt: skip
        return 2
    if not INSTALLED:
        # What pip does on install: without it (PYTHONDONTWRITEBYTECODE) every
        # tapd process would compile tapd's source first.
        compileall.compile_dir(REPO / "tapd", quiet=1)
    if args.quick:
        args.rounds, args.per_round, args.total, args.clients = 2, 10, 128, 16
    levels = [0, 250, 500, 1000] if not args.quick else [0, 50]

    # The cold start goes first: after the phases with thousands of taps this
    # VM stays slower for a minute or two, past what quiesce() can see (the
    # cold start measured 0.59-0.72 s right after the lease phase, with the
    # CPUs idle and RTNL free; 0.41-0.54 s later on).
    cold = cold_start(max(3, 2 * args.rounds))
    with helper_acl():
        taps = per_tap(args.rounds, args.per_round)
        quiesce()
        tput = throughput(args.total, args.clients)
        quiesce()
        starts = vm_starts(args.rounds, args.clients)
    quiesce()
    mq = multiqueue(args.rounds)
    quiesce()
    scale, footprint = scaling(levels, args.per_round)

    floor, bare, helper, tapd = taps["floor"], taps["bare trio"], taps["helper"], taps["tapd"]
    print(f"tapd benchmark on {platform.node()}: {os.cpu_count()} cores, "
          f"Linux {platform.release()}, Python {platform.python_version()}")  # fmt: skip
    print(f"{'what':34s} {'median ms':>9s} {'p99 ms':>9s} {'/helper':>8s} {'/floor':>7s}")
    for s in (floor, bare, helper, tapd, taps[REMOVAL]):
        print(f"{'per tap: ' + s.name:34s} {ms(s.median)} {ms(s.p99)} "
              f"{s.median / helper.median:8.2f} {s.median / floor.median:7.2f}")  # fmt: skip
    py, removal = taps["python -c pass"], taps[REMOVAL]
    for s in (taps[k] for k in PROCESSES):
        # tapctl's true exits holding the tap's last fd: the kernel's removal
        # of the tap is its exit's, as it would be any process's (floor)
        floor_ms = py.median + (removal.median if s.name.startswith("tapctl") else 0)
        print(f"{'process: ' + s.name:34s} {ms(s.median)} {ms(s.p99)} "
              f"{s.median / helper.median:8.2f} {'':7s} "
              f"{s.median / py.median:5.2f}x python"
              + (f", {s.median / floor_ms:4.2f}x python + removal" if floor_ms != py.median
                 else ""))  # fmt: skip
    print(f"{'256 queues: floor':34s} {ms(mq['floor'].median)} {ms(mq['floor'].p99)}")
    print(f"{'256 queues: tapd':34s} {ms(mq['tapd'].median)} {ms(mq['tapd'].p99)} "
          f"{'':8s} {mq['tapd'].median / mq['floor'].median:7.2f}")  # fmt: skip
    for level, pair in scale.items():
        extra = pair["tapd"].median - pair["floor"].median
        print(f"{f'{level} leases: tapd - floor':34s} {ms(extra)} "
              f"{'':9s} {'':8s} {pair['tapd'].median / pair['floor'].median:7.2f}")  # fmt: skip
    print(f"throughput, {args.clients} clients, {args.total} taps: tapd {tput['tapd']:.0f}/s, "
          f"helper {tput['helper']:.0f}/s ({tput['tapd'] / tput['helper']:.2f}x)")  # fmt: skip
    qh, th, bp = starts["helper"], starts["tapd-bridge-helper"], starts["python"]
    print(f"{args.clients} VM starts at once (median of {len(qh.values)}): qemu-bridge-helper "
          f"{ms(qh.median).strip()} ms ({args.clients / qh.median:.0f}/s), tapd-bridge-helper "
          f"{ms(th.median).strip()} ms ({args.clients / th.median:.0f}/s), "
          f"{th.median / qh.median:.2f}x the time")  # fmt: skip
    print(f"{args.clients} python -c pass at once (floor): {ms(bp.median).strip()} ms, "
          f"{bp.median / qh.median:.2f}x qemu-bridge-helper's; tapd-bridge-helper "
          f"{th.median / bp.median:.2f}x it")  # fmt: skip
    print(f"at {footprint['leases']} leases: RSS {footprint['rss_bytes'] / 2**20:.1f} MiB, "
          f"{footprint['open_fds']} open fds")  # fmt: skip
    ct, cs = cold["tapd"], cold["stack"]
    print(f"cold start to a first tap (socket activation): median {ms(ct.median)} ms, "
          f"max {ms(max(ct.values))} ms")  # fmt: skip
    print(f"cold start floor (python, trio, structlog, a pydantic model): median "
          f"{ms(cs.median)} ms; tapd's own {ms(ct.median - cs.median).strip()} ms")  # fmt: skip

    if args.json:
        doc = {
            "machine": {"node": platform.node(), "cores": os.cpu_count(),
                        "kernel": platform.release(), "python": platform.python_version()},
            "per_tap": {k: {"median": v.median, "p99": v.p99, "n": len(v.values)}
                        for k, v in taps.items()},
            "multiqueue_256": {k: {"median": v.median, "p99": v.p99} for k, v in mq.items()},
            "scaling": {str(level): {k: v.median for k, v in pair.items()}
                        for level, pair in scale.items()},
            "throughput_per_s": tput,
            "vm_starts_at_once": {k: {"median": v.median, "max": max(v.values),
                                      "clients": args.clients} for k, v in starts.items()},
            "footprint": footprint,
            "cold_start": {"median": cold["tapd"].median, "max": max(cold["tapd"].values),
                           "stack_median": cold["stack"].median},
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
