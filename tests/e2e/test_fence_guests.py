"""Fenced ports with real guests: on a bridge whose rule has ``mac_filtering``
and ``port_isolation``, a guest whose NIC uses tapd's ``{mac}`` reaches the
bridge but not an isolated neighbour, and a guest that sends with another MAC
reaches nothing.  The same guests on an unfenced rule reach both (the
control), so a failure to ping in the fenced run is the fence's doing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest import GuestImage, qemu_argv
from tapdtest import Daemon, ip, run_daemon
from test_matrix import Qemu, single_thread_tcg

BRIDGE = "10.77.8.1"
A, B, C = "10.77.8.2", "10.77.8.3", "10.77.8.4"

RULE = """
[[allow]]
users = ["0"]
bridges = ["br0"]
{fence}
"""


@pytest.fixture(params=["fenced", "control"])
def tenant_bridge(
    request: pytest.FixtureRequest, ns: str, br0: str, tmp_path: Path
) -> Iterator[tuple[Daemon, bool]]:
    fenced = request.param == "fenced"
    fence = "mac_filtering = true\nport_isolation = true" if fenced else ""
    ip("-n", ns, "addr", "add", f"{BRIDGE}/24", "dev", "br0")
    with run_daemon(ns, tmp_path, RULE.format(fence=fence)) as daemon:
        yield daemon, fenced


def guest(daemon: Daemon, image: GuestImage, addr: str, ping: str, mac: str, extra: str) -> Qemu:
    argv = qemu_argv(
        image,
        "tap,id=n0,fd={fd}",
        ip=f"{addr}/24",
        ping=ping,
        device=f"virtio-net-pci,netdev=n0,mac={mac}",
        extra_cmdline=extra,
    )
    tapctl = [sys.executable, "-m", "tapd.tapctl", "--socket", daemon.socket_path]
    return Qemu([*tapctl, "request", "--br", "br0", "--", *single_thread_tcg(argv)])


def test_a_fenced_guest_reaches_the_bridge_only_and_a_spoofing_one_nothing(
    tenant_bridge: tuple[Daemon, bool], guest_image: GuestImage
) -> None:
    daemon, fenced = tenant_bridge
    # A answers pings once up; B pings A (its neighbour); C sends with a MAC
    # of its own choosing instead of {mac}.  Failing pings give up after
    # pingtries seconds, so the fenced run stays short.
    with (
        guest(daemon, guest_image, A, BRIDGE, "{mac}", "tapd.pingtries=30 tapd.listen=1") as a,
        # B boots alongside A and keeps trying until A is up
        guest(daemon, guest_image, B, A, "{mac}", "tapd.pingtries=40") as b,
        guest(daemon, guest_image, C, BRIDGE, "52:54:00:66:66:66", "tapd.pingtries=25") as c,
    ):
        for vm in (a, b, c):
            vm.wait_for("nic")
        # tapctl exec'd each QEMU: the grant's peer pid is the guest's QEMU
        grants = [e for e in daemon.log() if e["event"] == "request.granted"]
        macs = {e["pid"]: e["guest_mac"] for e in grants}
        assert sorted(macs) == sorted([a.pid, b.pid, c.pid])
        assert len(set(macs.values())) == 3  # tapd gave every guest its own
        # The guests that used {mac} have tapd's MAC on their NIC.
        assert a.report()["mac"] == macs[a.pid] and b.report()["mac"] == macs[b.pid]
        report_a = a.wait_for("listen")
        assert report_a.get("ping") == "ok", a.output  # its own MAC reaches the bridge
        report_b = b.wait_for("ping")
        report_c = c.wait_for("ping")
        if fenced:
            assert report_b.get("ping") == "fail", f"isolated neighbours met:\n{b.output}"
            assert report_c.get("ping") == "fail", f"a spoofed MAC got through:\n{c.output}"
        else:
            assert report_b.get("ping") == "ok", f"B:\n{b.output}\nA:\n{a.output}"
            assert report_c.get("ping") == "ok", c.output


# -- rate limits, measured by the guest ----------------------------------------

#: a tiny HTTP server on the bridge: GET /N answers N bytes, POST swallows the body
HTTP_SERVER = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        n = int(self.path.strip("/"))
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        chunk = bytes(65536)
        while n:
            self.wfile.write(chunk[: min(n, len(chunk))])
            n -= min(n, len(chunk))
    def do_POST(self):
        n = int(self.headers["Content-Length"])
        while n:
            n -= len(self.rfile.read(min(n, 65536)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], 8080), H).serve_forever()
"""

INGRESS_BITS, EGRESS_BITS = 4_000_000, 2_000_000
FETCH_BYTES, POST_KIB = 2_000_000, 500


@pytest.mark.parametrize("shaped", [True, False], ids=["limited", "control"])
def test_a_guest_measures_its_own_rate_limits(
    shaped: bool, ns: str, br0: str, tmp_path: Path, guest_image: GuestImage
) -> None:
    limits = f'ingress_limit = "{INGRESS_BITS}bit"\negress_limit = "{EGRESS_BITS}bit"'
    ip("-n", ns, "addr", "add", f"{BRIDGE}/24", "dev", "br0")
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", HTTP_SERVER, BRIDGE]
    )
    try:
        with run_daemon(ns, tmp_path, RULE.format(fence=limits if shaped else "")) as daemon:
            url = f"http://{BRIDGE}:8080"
            vm = guest(
                daemon, guest_image, A, BRIDGE, "{mac}",
                f"tapd.fetch={url}/{FETCH_BYTES} tapd.post={url}/,{POST_KIB}",
            )  # fmt: skip
            with vm:
                report = vm.wait_for("post", timeout=240)
        assert report.get("fetch") == "ok" and report.get("post") == "ok", vm.output
        received = FETCH_BYTES * 8 / (float(report["ft1"]) - float(report["ft0"]))
        sent = POST_KIB * 1024 * 8 / (float(report["pt1"]) - float(report["pt0"]))
        print(f"guest received {received / 1e6:.2f} Mbit/s, sent {sent / 1e6:.2f} Mbit/s")
        if shaped:
            assert 0.8 * INGRESS_BITS <= received <= 1.2 * INGRESS_BITS, received
            assert 0.8 * EGRESS_BITS <= sent <= 1.2 * EGRESS_BITS, sent
        else:
            # the control shows the limit, not the guest, is what held it back
            assert received > 1.5 * INGRESS_BITS and sent > 1.5 * EGRESS_BITS, (received, sent)
    finally:
        server.kill()
        server.wait()


# -- addresses: a guest may use only its own --------------------------------------

ADDRESSED = 'ip_ranges = ["10.77.8.0/24"]\nmac_filtering = true'


@pytest.mark.parametrize("spoof", [False, True], ids=["own-address", "another-address"])
def test_a_guest_using_an_address_not_its_own_reaches_nothing(
    spoof: bool, ns: str, br0: str, tmp_path: Path, guest_image: GuestImage
) -> None:
    ip("-n", ns, "addr", "add", f"{BRIDGE}/24", "dev", "br0")
    with run_daemon(ns, tmp_path, RULE.format(fence=ADDRESSED)) as daemon:
        used = B if spoof else A  # the guest is granted A either way
        argv = qemu_argv(
            guest_image,
            "tap,id=n0,fd={fd}",
            ip=f"{used}/24",
            ping=BRIDGE,
            device="virtio-net-pci,netdev=n0,mac={mac}",
            extra_cmdline="tapd.pingtries=20 tapd.listen=1",
        )
        tapctl = [sys.executable, "-m", "tapd.tapctl", "--socket", daemon.socket_path]
        request = [*tapctl, "request", "--br", "br0", "--guest-ip", A, "--"]
        with Qemu([*request, *single_thread_tcg(argv)]) as vm:
            report = vm.wait_for("listen", timeout=180)
            # The host asks who has the guest's address: the guest's ARP reply
            # (for an address not its own when spoofing) is what is filtered.
            answered = subprocess.run(
                ["ip", "netns", "exec", ns, "busybox", "ping", "-c", "2", "-W", "2", used],
                capture_output=True,
            ).returncode == 0  # fmt: skip
        if spoof:
            assert report.get("ping") == "fail", vm.output
            assert not answered, "the host reached a guest on an address not its own"
        else:
            assert report.get("ping") == "ok", vm.output
            assert answered
