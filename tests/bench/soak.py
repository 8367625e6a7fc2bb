"""Soak: many requests from many clients, a share of them malformed, refused
or vanishing, while tapd's RSS and open fds are sampled.

Run as root from the repository:

    python tests/bench/soak.py [--requests 50000] [--clients 16] [--json FILE]

It makes a network namespace of its own with a bridge ``br0`` (allowed) and
``br1`` (refused by the policy), starts tapd there, and forks ``--clients``
client processes sharing ``--requests`` among them.  Each request is drawn
from a seeded mix:

* ``request`` (60%): a tap on br0, its fd closed at once;
* ``hold`` (10%): a tap on br0 kept while the client goes on (at most four a
  client, the oldest closed first), so leases live across other requests;
* ``malformed`` (10%): a line tapd must refuse (not JSON, unknown op, bad
  option, a key QEMU does not know);
* ``refused`` (10%): a tap on br1, which the policy denies;
* ``vanish`` (10%): a request whose client closes without reading the reply.

Every outcome must be the expected one (a grant, a clear error code, a
refusal).  After the clients are done and every lease has ended, tapd must
hold exactly the fds it held after its first request, and its RSS may have
grown by at most ``--rss-bound`` MiB since the end of the warm-up (the first
10% of requests: allocator arenas, caches and the like fill there).  The
small version runs in CI (tests/integration/test_soak.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tapdtest import ip, netns, run_daemon, taps, wait_until

from tapd import client

CONFIG = '[[allow]]\nusers = ["0"]\nbridges = ["br0"]\n'
MIX = {"request": 60, "hold": 10, "malformed": 10, "refused": 10, "vanish": 10}
MALFORMED = [
    b"not json\n",
    b'{"op": "nope"}\n',
    b'{"op": "request", "br": "br0", "queues": "many"}\n',
    b'{"op": "request", "br": "br0", "no_such_key": 1}\n',
    b'{"op": "request", "br": "br0", "fd": "3"}\n',  # fd= without the fd
    b"[1, 2, 3]\n",
]
HOLD_MAX = 4


@dataclass
class Report:
    requests: int
    clients: int
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    #: (seconds since start, RSS KiB, open fds) of tapd
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    baseline_fds: int = 0
    final_fds: int = 0
    warm_rss_kib: int = 0
    final_rss_kib: int = 0

    @property
    def rss_growth_mib(self) -> float:
        return (self.final_rss_kib - self.warm_rss_kib) / 1024


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _raw(path: str, line: bytes, read: bool) -> dict[str, Any] | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(line)
        if not read:
            return None
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        reply: dict[str, Any] = json.loads(data)
        return reply


def _client(path: str, count: int, seed: int, out: int) -> None:
    """One client's share; reports its outcomes as one JSON line on ``out``."""
    rng = random.Random(seed)
    kinds, weights = list(MIX), list(MIX.values())
    outcomes: dict[str, int] = {}
    unexpected: list[str] = []
    held: list[client.TapGrant] = []
    for _ in range(count):
        kind = rng.choices(kinds, weights)[0]
        outcome = kind
        try:
            if kind in ("request", "hold"):
                grant = client.request_tap(path=path, br="br0")
                if kind == "request":
                    grant.close()
                else:
                    held.append(grant)
                    if len(held) > HOLD_MAX:
                        held.pop(0).close()
            elif kind == "refused":
                try:
                    client.request_tap(path=path, br="br1").close()
                    unexpected.append("a request for br1 was granted")
                except client.ClientError as exc:
                    if exc.code != "denied":
                        unexpected.append(f"br1: {exc.code} {exc.message}")
            elif kind == "malformed":
                reply = _raw(path, rng.choice(MALFORMED), read=True)
                if not reply or reply.get("ok") or not reply.get("error", {}).get("code"):
                    unexpected.append(f"malformed line answered {reply}")
            else:
                _raw(path, b'{"op": "request", "br": "br0"}\n', read=False)
        except Exception as exc:
            outcome = "error"
            unexpected.append(f"{kind}: {exc!r}")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    for grant in held:
        grant.close()
    line = json.dumps({"outcomes": outcomes, "unexpected": unexpected[:20]}) + "\n"
    os.write(out, line.encode())


def _steady_fds(pid: int) -> int:
    counts = [len(os.listdir(f"/proc/{pid}/fd"))]
    while len(counts) < 5 or len(set(counts[-5:])) != 1:
        time.sleep(0.05)
        counts.append(len(os.listdir(f"/proc/{pid}/fd")))
    return counts[-1]


def _run_clients(path: str, total: int, clients: int, seed: int) -> dict[str, Any]:
    """``total`` requests shared by ``clients`` forked processes; their
    outcomes summed."""
    r, w = os.pipe()
    pids = []
    for n in range(clients):
        share = total // clients + (n < total % clients)
        child = os.fork()
        if child == 0:
            os.close(r)
            try:
                _client(path, share, seed * 1000 + n, w)
            finally:
                os._exit(0)
        pids.append(child)
    os.close(w)
    summed: dict[str, Any] = {"outcomes": {}, "unexpected": []}
    with os.fdopen(r) as lines:
        for line in lines:
            got = json.loads(line)
            for kind, count in got["outcomes"].items():
                summed["outcomes"][kind] = summed["outcomes"].get(kind, 0) + count
            summed["unexpected"] += got["unexpected"]
    for child in pids:
        os.waitpid(child, 0)
    return summed


def soak(requests: int, clients: int, workdir: Path, seed: int = 0) -> Report:
    report = Report(requests=requests, clients=clients)
    with netns("tapd-soak-") as ns:
        for bridge in ("br0", "br1"):
            ip("-n", ns, "link", "add", bridge, "type", "bridge")
            ip("-n", ns, "link", "set", bridge, "up")
        with run_daemon(ns, workdir, CONFIG) as daemon:
            pid = daemon.proc.pid
            report.baseline_fds = daemon.warm_fds()
            start = time.monotonic()
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    with contextlib.suppress(OSError):
                        report.samples.append(
                            (
                                round(time.monotonic() - start, 2),
                                _rss_kib(pid),
                                len(os.listdir(f"/proc/{pid}/fd")),
                            )
                        )
                    stop.wait(0.25)

            sampler = threading.Thread(target=sample)
            sampler.start()
            # Warm-up (the first 10%), then the rest, each shared by all clients.
            warm = max(requests // 10, clients)
            for round_, total in enumerate((warm, requests - warm)):
                got = _run_clients(daemon.socket_path, total, clients, seed * 100 + round_)
                for kind, count in got["outcomes"].items():
                    report.outcomes[kind] = report.outcomes.get(kind, 0) + count
                report.unexpected += got["unexpected"]
                if round_ == 0:
                    wait_until(lambda: daemon.leases() == [], timeout=60, what="warm-up leases")
                    report.warm_rss_kib = _rss_kib(pid)
            report.seconds = round(time.monotonic() - start, 1)
            wait_until(lambda: daemon.leases() == [], timeout=60, what="every lease to end")
            wait_until(lambda: taps(ns) == [], timeout=60, what="every tap to go")
            stop.set()
            sampler.join()
            report.final_fds = _steady_fds(pid)
            report.final_rss_kib = _rss_kib(pid)
            errors = [e for e in daemon.log() if e.get("level") in ("error", "critical")]
            report.unexpected += [f"tapd logged {e}" for e in errors[:20]]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 32))
    parser.add_argument("--rss-bound", type=float, default=4.0, metavar="MIB")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tapd-soak-") as tmp:
        report = soak(args.requests, args.clients, Path(tmp), args.seed)
    print(f"seed {args.seed}: {report.requests} requests from {report.clients} clients "
          f"in {report.seconds} s: {report.outcomes}")  # fmt: skip
    print(f"tapd fds {report.baseline_fds} -> {report.final_fds}; RSS after warm-up "
          f"{report.warm_rss_kib} KiB, at the end {report.final_rss_kib} KiB "
          f"(+{report.rss_growth_mib:.2f} MiB, bound {args.rss_bound} MiB); "
          f"peak fds {max(s[2] for s in report.samples)}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1))
    ok = (
        not report.unexpected
        and report.final_fds == report.baseline_fds
        and report.rss_growth_mib <= args.rss_bound
    )
    for problem in report.unexpected:
        print("unexpected:", problem)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
