"""What tapd's metrics cost: the request path, a scrape, and nothing at start.

Run as root from the repository:  python tests/bench/bench_metrics.py

1. recording, in-process: one :meth:`Recorder.request` for a grant and for a
   denial, plus the two clock reads the server makes around it (best of 7
   runs of 100,000 calls, so a busy machine inflates nothing);
2. a grant end to end, with recording and with it stubbed out: two tapds in
   one namespace, the second started through a wrapper that replaces
   ``Recorder.request`` with a no-op, measured in interleaved rounds from a
   client process, as bench_tapd.py measures tapd;
3. a scrape: the ``metrics`` op against a fresh tapd (its first render
   imports prometheus_client) and again, beside ``hello``; ``tapctl
   metrics`` as a whole process; and in-process, a snapshot (what the loop
   pays) and a render (what the thread pays) at 1,000 leases over 50 bridges
   with every op and outcome recorded;
4. what tapd's start imports, and what prometheus_client adds at the first
   scrape (which the start must not pay).
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from tapdtest import ip, netns, wait_until  # noqa: E402

from tapd import client  # noqa: E402
from tapd.errors import Denied  # noqa: E402
from tapd.leases import Lease  # noqa: E402
from tapd.metrics import Recorder, render  # noqa: E402

#: tapd with recording stubbed out, for the A/B
NO_METRICS = """
import sys
from tapd import daemon, metrics
metrics.Recorder.request = lambda self, *a, **kw: None
sys.exit(daemon.main())
"""

#: a client process: N grants, each timed from connect to fd, held until the round ends
CLIENT = """
import json, os, sys, time
from tapd import client
out, held = [], []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    g = client.request_tap(path=sys.argv[1], br="br0")
    out.append(time.perf_counter() - t)
    held.extend(g.tap_fds)
print(json.dumps(out), flush=True)
"""


def recording() -> dict[str, float]:
    r = Recorder()
    clock = time.perf_counter
    denial = Denied("no").about(rule="deny[0]")

    def grant() -> None:
        started = clock()
        r.request("request", started, rule="allow[0]", granted=True)

    def deny() -> None:
        started = clock()
        r.request("request", started, error=denial)

    n = 100_000
    return {
        name: min(timeit.repeat(fn, number=n, repeat=7)) / n * 1e6
        for name, fn in (("grant", grant), ("denial", deny))
    }


@contextmanager
def tapd(ns: str, wrapper: str | None = None) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="tapd-bm-") + "/s"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(512)
    argv = [sys.executable, "-c", wrapper] if wrapper else [sys.executable, "-m", "tapd.daemon"]
    argv += ["--listen-fd", str(listener.fileno())]
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, *argv],
        pass_fds=[listener.fileno()],
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    listener.close()
    try:
        yield path
    finally:
        proc.terminate()
        proc.wait()
        os.unlink(path)
        os.rmdir(os.path.dirname(path))


def round_of(ns: str, path: str, count: int) -> list[float]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, path, str(count)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    # The client has exited: its taps go; wait for tapd to have seen them go.
    wait_until(lambda: client.leases(path=path) == [], timeout=60, what="the round's taps to go")
    times: list[float] = json.loads(out)
    return times


def end_to_end(rounds: int, per_round: int) -> dict[str, float]:
    with netns("tapd-bm-") as ns:
        ip("-n", ns, "link", "add", "br0", "type", "bridge")
        ip("-n", ns, "link", "set", "br0", "up")
        with tapd(ns) as on, tapd(ns, NO_METRICS) as off:
            series: dict[str, list[float]] = {"recording": [], "stubbed": []}
            contenders = [("recording", on), ("stubbed", off)]
            for path in (on, off):  # warm both (netlink sockets, caches)
                round_of(ns, path, 5)
            for i in range(rounds):
                for name, path in contenders[i % 2 :] + contenders[: i % 2]:
                    series[name] += round_of(ns, path, per_round)
            return {name: statistics.median(v) * 1e3 for name, v in series.items()}


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def scrape() -> dict[str, float]:
    tapctl = [sys.executable, "-m", "tapd.tapctl", "--socket"]
    with netns("tapd-bm-") as ns, tapd(ns) as path:
        client.hello(path=path)
        op = lambda: client.call({"op": "metrics"}, path=path)  # noqa: E731
        first = timed(op)
        again = statistics.median(timed(op) for _ in range(9))
        hello = statistics.median(timed(lambda: client.hello(path=path)) for _ in range(9))
        run = lambda *a: subprocess.run([*tapctl, path, *a], capture_output=True, check=True)  # noqa: E731
        cli = statistics.median(timed(lambda: run("metrics")) for _ in range(5))
        cli_hello = statistics.median(timed(lambda: run("hello")) for _ in range(5))
    r = Recorder()
    for op_name in (
        "hello",
        "request",
        "bridge-helper",
        "list",
        "release",
        "status",
        "metrics",
        "",
    ):
        for rule in ("allow[0]", "allow[1]", "deny[0]", "no-match"):
            r.request(op_name, time.perf_counter(), rule=rule, granted=True)
            r.request(op_name, time.perf_counter(), error=Denied("no").about(rule=rule))
    leases = [
        Lease(
            id=f"{i:012x}",
            ifname=f"tap{i}",
            ifindex=i,
            bridge=f"br{i % 50}",
            queues=1,
            uid=1000 + i % 20,
            gid=1000,
            pid=1,
            starttime=1,
            created=0,
        )
        for i in range(1000)
    ]
    snapshot = statistics.median(
        timed(lambda: r.snapshot(leases, 10, {"restored": 1000})) for _ in range(9)
    )
    snap = r.snapshot(leases, 10, {"restored": 1000})
    text = render(snap)
    rendered = statistics.median(timed(lambda: render(snap)) for _ in range(9))
    return {
        "metrics op, first in a fresh tapd (ms)": first,
        "metrics op, again (ms)": again,
        "hello op, for comparison (ms)": hello,
        "tapctl metrics, whole process (ms)": cli,
        "tapctl hello, whole process (ms)": cli_hello,
        "snapshot on the loop, 1000 leases (ms)": snapshot,
        "render, 1000 leases, 50 bridges (ms)": rendered,
        "exposition lines": float(len(text.splitlines())),
    }


#: in one fresh interpreter: what tapd's start imports, then what a first scrape adds
IMPORTS = """
import sys, time
t = time.perf_counter()
import tapd.daemon
daemon = time.perf_counter() - t
assert "prometheus_client" not in sys.modules
t = time.perf_counter()
import prometheus_client
print(daemon, time.perf_counter() - t)
"""


def imports() -> dict[str, float]:
    runs = [
        [float(x) for x in subprocess.run(
            [sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True, cwd=REPO
        ).stdout.split()]
        for _ in range(7)
    ]  # fmt: skip
    return {
        "import tapd.daemon (ms)": statistics.median(r[0] for r in runs) * 1e3,
        "then prometheus_client, at a first scrape (ms)": statistics.median(r[1] for r in runs)
        * 1e3,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--per-round", type=int, default=40)
    args = p.parse_args()
    results: dict[str, dict[str, float]] = {
        "recording (us a call, clock reads included)": recording(),
        "grant end to end, median (ms)": end_to_end(args.rounds, args.per_round),
        "scrape": scrape(),
        "start-up": imports(),
    }
    for section, values in results.items():
        print(section)
        for name, value in values.items():
            print(f"  {name:45} {value:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
