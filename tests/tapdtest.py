"""Helpers the integration and end-to-end tests share: network namespaces of
their own, a real tapd running in one, and raw clients."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tapd import client, fdpass, protocol, tun


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@contextlib.contextmanager
def netns(prefix: str = "tapd-t-") -> Iterator[str]:
    """A fresh network namespace, deleted (with all its interfaces) on exit."""
    name = prefix + os.urandom(4).hex()
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        ip("netns", "delete", name, check=False)


def links(ns: str) -> dict[str, dict[str, Any]]:
    """Every interface in ``ns`` by name, as ``ip -d -j link`` reports it."""
    out = ip("-n", ns, "-d", "-j", "link", "show").stdout
    return {link["ifname"]: link for link in json.loads(out)}


def wait_until(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def taps(ns: str) -> list[str]:
    return [
        name
        for name, link in links(ns).items()
        if link.get("linkinfo", {}).get("info_kind") == "tun"
    ]


def redirect_target(ns: str, dev: str) -> str | None:
    """The device tc redirects what arrives on ``dev`` to (a shaped guest's
    ifb), or None."""
    out = subprocess.run(
        ["tc", "-n", ns, "filter", "show", "dev", dev, "parent", "ffff:"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    marker = "Redirect to device "
    if marker not in out:
        return None
    return out.split(marker, 1)[1].split(")", 1)[0]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Daemon:
    """A real tapd in ``ns``, serving a socket the test opened itself and
    handed over with --listen-fd (so there is no race with its start-up)."""

    ns: str
    socket_path: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def call(self, request: dict[str, Any], **kw: Any) -> tuple[dict[str, Any], list[int]]:
        return client.call(request, path=self.socket_path, **kw)

    def request(self, **options: Any) -> client.TapGrant:
        return client.request_tap(path=self.socket_path, **options)

    def raw(self, data: bytes, fds: list[int] | None = None) -> list[dict[str, Any]]:
        """Send raw bytes, half-close, and return every reply line."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(self.socket_path)
            try:
                if fds:
                    fdpass.send_line_sync(sock, data, fds)
                else:
                    sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except BrokenPipeError:
                pass  # the daemon answered early and closed; read what it said
            replies = []
            buf = b""
            while True:
                try:
                    got = fdpass.recv_sync(sock)
                except ConnectionResetError:
                    break  # closed with our unread bytes still queued: its reply came first
                tun.close_all(got.fds)
                if not got.data:
                    break
                buf += got.data
            for line in buf.splitlines():
                replies.append(protocol.decode_reply(line))
            return replies

    def log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line]

    def pid_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def warm_fds(self, bridge: str = "br0") -> int:
        """The daemon's open fd count once it has served a first request (its
        netlink socket and kernel thread are made lazily)."""
        self.request(br=bridge).close()
        wait_until(lambda: taps(self.ns) == [], what="the warm-up tap to vanish")
        wait_until(lambda: self.leases() == [], what="the warm-up lease to end")
        # The lease's owner watch closes its pidfd just after the lease ends.
        counts = [self.pid_fds()]
        while len(counts) < 5 or len(set(counts[-5:])) != 1:
            time.sleep(0.02)
            counts.append(self.pid_fds())
        return counts[-1]

    def leases(self) -> list[dict[str, Any]]:
        reply, _ = self.call({"op": "list"})
        return list(reply["leases"])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def daemon_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tapd.daemon", *args]


@contextlib.contextmanager
def run_daemon(ns: str, workdir: Path, config: str | None = None) -> Iterator[Daemon]:
    # sun_path holds 107 bytes: pytest's tmp_path can be longer than that.
    path = tempfile.mkdtemp(prefix="tapd-") + "/s"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1024)
    args = ["--listen-fd", str(listener.fileno())]
    if config is not None:
        cfg = workdir / "tapd.toml"
        cfg.write_text(config)
        args += ["--config", str(cfg)]
    log_path = workdir / "tapd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *daemon_argv(*args)],
            pass_fds=[listener.fileno()],
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    listener.close()  # the daemon has its own copy now
    daemon = Daemon(ns=ns, socket_path=path, proc=proc, log_path=log_path)
    try:
        yield daemon
    finally:
        daemon.stop()
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(os.path.dirname(path))


_MAKE_TAP = """
import socket, sys
from tapd import fdpass, tun
sock = socket.socket(fileno=int(sys.argv[1]))
fds = tun.create_tap(sys.argv[2], queues=int(sys.argv[3]), vnet_hdr=sys.argv[4] == "1")
fdpass.send_line_sync(sock, b"ok\\n", fds)
"""


def make_tap_in(ns: str, name: str, queues: int = 1, vnet_hdr: bool = True) -> list[int]:
    """Queue fds of a new tap made inside ``ns`` (by a helper process that has
    joined it), the way a VMM's own manager might have made it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        subprocess.run(
            [
                "ip", "netns", "exec", ns, sys.executable, "-c", _MAKE_TAP,
                str(theirs.fileno()), name, str(queues), "1" if vnet_hdr else "0",
            ],
            pass_fds=[theirs.fileno()],
            check=True,
        )  # fmt: skip
        got = fdpass.recv_sync(ours)
        assert got.data == b"ok\n", got.data
        return got.fds


#: systemd/ in the repository: the units the README installs
UNITS = Path(__file__).resolve().parents[1] / "systemd"


def unit_directives(unit: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file in systemd/, values by key in order."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out
