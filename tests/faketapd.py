"""A stand-in for tapd on a UNIX socket, for client tests that need no root.

It answers each op with a canned reply (a dict, raw bytes, or None for no
answer at all), and sends a granted reply's ``fds`` + ``vhostfds`` fds (pipe
ends) with it, the way tapd does.  The real daemon's behaviour is tested
against the real daemon (tests/integration); this one only lets a test choose
what a client meets.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

from tapd import scm

Reply = dict[str, Any] | bytes | None

GRANT: dict[str, Any] = {
    "ok": True, "lease": "5c0f3a9e61d2", "ifname": "tap3f9c01aa", "bridge": "br0",
    "fds": 1, "vhostfds": 0, "vnet_hdr": True, "vnet_hdr_len": 10,
    "mac": "fe:41:9d:0c:77:e2", "mtu": 1500, "sndbuf": 2147483647, "offloads": 0,
    "warnings": [],
}  # fmt: skip
LEASE: dict[str, Any] = {
    "id": "5c0f3a9e61d2", "ifname": "tap3f9c01aa", "ifindex": 7, "bridge": "br0",
    "queues": 1, "uid": 0, "gid": 0, "pid": 1, "created": 1_700_000_000, "downscript": None,
}  # fmt: skip

#: what tapd on its built-in defaults answers (no "config": there is no file)
DEFAULTS: dict[str, Reply] = {
    "hello": {"ok": True, "protocol": 1, "version": "0.1.0", "ops": ["hello", "request"]},
    "status": {"ok": True, "version": "0.1.0", "protocol": 1, "uptime": 12.5, "leases": 1,
               "connections": 1},
    "list": {"ok": True, "leases": [LEASE]},
    "release": {"ok": True, "lease": LEASE},
    "request": GRANT,
    "bridge-helper": GRANT,
    "prepare": {"ok": True, "lease": "5c0f3a9e61d2", "ifname": "tap3f9c01aa", "bridge": "br0",
                "guest_mac": "52:54:00:0c:77:e2", "mtu": 1500, "queues": 1, "warnings": []},
}  # fmt: skip


class FakeTapd:
    def __init__(self, replies: dict[str, Reply]) -> None:
        self.replies = replies
        self.requests: list[dict[str, Any]] = []
        self.dir = tempfile.mkdtemp(prefix="faketapd-")
        self.path = f"{self.dir}/s"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(64)
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with contextlib.suppress(OSError):
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while not data.endswith(b"\n"):
            got = scm.recv_sync(conn)
            got.close_fds()
            if not got.data:
                conn.close()
                return
            data += got.data
        request = json.loads(data)
        self.requests.append(request)
        reply = self.replies.get(request.get("op"))
        if reply is None:
            self._held.append(conn)  # never answered, never closed: a wedged tapd
            return
        with conn:
            if isinstance(reply, bytes):
                conn.sendall(reply)
                return
            fds: list[int] = []
            if reply.get("ok"):
                for _ in range(int(reply.get("fds", 0)) + int(reply.get("vhostfds", 0))):
                    r, w = os.pipe()
                    os.close(w)
                    fds.append(r)
            try:
                scm.send_line_sync(conn, json.dumps(reply).encode() + b"\n", fds)
            finally:
                scm.close_all(fds)

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)
        for conn in self._held:
            conn.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self.dir)


@contextlib.contextmanager
def fake_tapd(**overrides: Reply) -> Iterator[FakeTapd]:
    """A fake tapd answering as the built-in defaults do, but for ``overrides``
    (by op, with ``bridge_helper`` for ``bridge-helper``)."""
    replies = dict(DEFAULTS)
    replies.update({op.replace("_", "-"): reply for op, reply in overrides.items()})
    fake = FakeTapd(replies)
    try:
        yield fake
    finally:
        fake.close()
