"""The end-to-end matrix: every way a real QEMU gets its tap from tapd, each
with a real guest whose serial report (``TAPD-GUEST k=v``) is what is judged.

* ``tapctl request -- qemu ... fd={fd}``: test_tapctl_qemu.py (not repeated here);
* QEMU's own ``-netdev bridge,helper=...`` through tapd's helper stand-in, as a
  shell command and as the single-path ``tapd-bridge-helper`` (no setuid
  binary, no /etc/qemu/bridge.conf): the lease belongs to QEMU itself;
* a four-queue tap, through tapctl and through :mod:`tapd.client`;
* two guests on one bridge pinging each other;
* a bridge the policy refuses, by the helper and by tapctl: QEMU gets tapd's
  message, and no guest runs;
* QEMU killed with SIGKILL: its lease ends and its tap goes.

QEMU itself runs in the host's namespace: it only uses fds.  The daemon, the
bridges and the taps live in the test's network namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from guest import MARKER, GuestImage, parse_guest_output, qemu_argv, run_qemu
from tapdtest import Daemon, ip, links, run_daemon, taps, wait_until

from tapd import client

BRIDGE_ADDR = "10.77.3.1"
GUEST_A = "10.77.3.2"
GUEST_B = "10.77.3.3"
BOOT_TIMEOUT = 120.0
#: the single-path helper, installed next to the interpreter (venv or not)
HELPER_SCRIPT = Path(sys.executable).parent / "tapd-bridge-helper"
#: tapd's policy refusal for a bridge no allow rule covers (policy.py)
DENIED_BR1 = "uid 0 is not allowed to use bridge 'br1'"
#: a ping for the host side (iputils may be missing; busybox-static is there)
PING = ["ping"] if shutil.which("ping") else ["busybox", "ping"]


class Qemu:
    """A QEMU running in the background, its serial console (and stderr)
    collected by a thread, so a test can act while the guest runs."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        pass_fds: Sequence[int] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=tuple(pass_fds),
            env=None if env is None else dict(env),
        )
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            with self._lock:
                self._chunks.append(chunk)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode(errors="replace")

    def report(self) -> dict[str, str]:
        """What the guest has printed so far, in complete lines only (a
        line still arriving would read as ``ping=`` for ``ping=ok``)."""
        output = self.output
        if self.running():
            output = output[: output.rfind("\n") + 1]
        return parse_guest_output(output)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, key: str, timeout: float = BOOT_TIMEOUT) -> dict[str, str]:
        """The guest's report once it has printed ``key`` (e.g. ``ping``)."""
        deadline = time.monotonic() + timeout
        while True:
            report = self.report()
            if key in report:
                return report
            if not self.running():
                self._reader.join(5)
                report = self.report()
                if key in report:
                    return report
                raise AssertionError(
                    f"QEMU exited ({self.proc.returncode}) before the guest printed "
                    f"{key!r}:\n{self.output}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {key!r} from the guest in {timeout}s:\n{self.output}")
            time.sleep(0.05)

    def wait(self, timeout: float = BOOT_TIMEOUT) -> int:
        try:
            returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"QEMU still running after {timeout}s:\n{self.output}") from None
        self._reader.join(5)
        return returncode

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.running():
            self.proc.send_signal(sig)

    def __enter__(self) -> Qemu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.proc.wait()
        self._reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def tapctl_argv(daemon: Daemon, *args: str) -> list[str]:
    return [sys.executable, "-m", "tapd.tapctl", "--socket", daemon.socket_path, *args]


def tapctl_list(daemon: Daemon) -> list[dict[str, Any]]:
    """``tapctl list --json``, as root: every lease."""
    done = subprocess.run(
        tapctl_argv(daemon, "list", "--json"), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    try:
        leases: list[dict[str, Any]] = json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"tapctl list --json said {done.stdout!r} {done.stderr!r}") from None
    return leases


def single_thread_tcg(argv: list[str]) -> list[str]:
    """One TCG thread for every vCPU.  With more vCPUs than the host has
    CPUs (four here, on small CI machines), multi-threaded TCG can starve a
    vCPU that holds a guest spinlock for minutes ("soft lockup")."""
    i = argv.index("-accel")
    assert argv[i + 1] == "tcg", argv
    return [*argv[: i + 1], "tcg,thread=single", *argv[i + 2 :]]


def events(daemon: Daemon, prefix: str = "") -> list[dict[str, Any]]:
    """The daemon's JSON log events whose name starts with ``prefix`` (any
    other line on its stderr, such as a developer's trace, is not one)."""
    found = []
    for line in daemon.log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and str(event.get("event", "")).startswith(prefix):
                found.append(event)
    return found


def lease_events(daemon: Daemon) -> list[dict[str, Any]]:
    """The story of every lease, for messages."""
    return events(daemon, "lease.")


def bridge_address(daemon: Daemon, bridge: str = "br0") -> None:
    ip("-n", daemon.ns, "addr", "add", f"{BRIDGE_ADDR}/24", "dev", bridge)


def helper_netdev(daemon: Daemon, form: str, bridge: str) -> tuple[str, dict[str, str]]:
    """``-netdev bridge`` through tapd's helper, and QEMU's environment.

    ``command``: a helper string with spaces, which QEMU runs with ``sh -c``
    after appending ``--use-vnet --fd=N --br=BR``.  ``path``: the single
    executable ``tapd-bridge-helper``, which QEMU execs directly; a path
    cannot carry arguments, so the socket travels in $TAPD_SOCKET.
    """
    env = {k: v for k, v in os.environ.items() if k != client.ENV_SOCKET}
    if form == "command":
        helper = f"{sys.executable} -m tapd.tapctl --socket {daemon.socket_path} helper"
    else:
        assert HELPER_SCRIPT.is_file(), (
            f"{HELPER_SCRIPT} is missing: install tapd (pip install -e .) into this interpreter"
        )
        helper = str(HELPER_SCRIPT)
        env[client.ENV_SOCKET] = daemon.socket_path
    # QEMU's option parser: a literal comma would be doubled; there is none.
    assert "," not in helper, helper
    return f"bridge,id=n0,br={bridge},helper={helper}", env


def nic(mac_suffix: str, extra: str = "") -> str:
    """A virtio NIC with its own MAC: QEMU's default is the same for every guest."""
    return f"virtio-net-pci,netdev=n0,mac=52:54:00:77:03:{mac_suffix}{extra}"


def assert_no_taps_left(daemon: Daemon, what: str) -> None:
    wait_until(lambda: taps(daemon.ns) == [], timeout=5, what=f"no tap left {what}")
    wait_until(lambda: daemon.leases() == [], timeout=5, what=f"no lease left {what}")
    assert tapctl_list(daemon) == []


# -- 2. QEMU's -netdev bridge through tapd's helper ---------------------------


@pytest.mark.parametrize("form", ["command", "path"])
def test_qemu_bridge_helper_gets_a_tap_that_belongs_to_qemu(
    daemon: Daemon, guest_image: GuestImage, form: str
) -> None:
    bridge_address(daemon)
    netdev, env = helper_netdev(daemon, form, "br0")
    argv = qemu_argv(
        guest_image,
        netdev,
        ip=f"{GUEST_A}/24",
        ping=BRIDGE_ADDR,
        device=nic("02"),
        # From "nic" on, the pings and tapd.wait keep QEMU alive while we look.
        extra_cmdline="tapd.pingcount=3 tapd.wait=2",
    )
    with Qemu(argv, env=env) as vm:
        # The NIC is up: QEMU has had its tap since before the guest booted.
        vm.wait_for("nic")
        leases = tapctl_list(daemon)
        assert vm.running(), vm.output
        assert [lease["pid"] for lease in leases] == [vm.pid], (
            f"want one lease owned by QEMU (pid {vm.pid}), got {leases}; the daemon's "
            f"lease events: {lease_events(daemon)} (a lease whose owner exits at once "
            "belonged to the helper's short-lived parent, not to QEMU)"
        )
        (lease,) = leases
        assert (lease["bridge"], lease["queues"], lease["uid"]) == ("br0", 1, 0), lease
        assert taps(daemon.ns) == [lease["ifname"]]
        assert links(daemon.ns)[lease["ifname"]].get("master") == "br0"

        report = vm.wait_for("ping")
        assert report.get("ping") == "ok", vm.output
        assert report.get("received") == "3", vm.output
        returncode = vm.wait()
    assert returncode == 0, vm.output
    assert "done" in vm.report(), vm.output
    helped = [e for e in events(daemon, "request.") if e.get("op") == "bridge-helper"]
    assert [e["outcome"] for e in helped] == ["granted"], helped
    assert_no_taps_left(daemon, "after QEMU exited")


# -- 3. four queues ------------------------------------------------------------

MQ_DEVICE = nic("03", ",mq=on,vectors=10")  # 2 * queues + 2 vectors


def assert_four_queues(report: dict[str, str], output: str) -> None:
    assert report.get("rxqueues") == "4", output
    assert report.get("txqueues") == "4", output
    assert report.get("ping") == "ok", output
    assert report.get("received") == "3", output
    assert "done" in report, output


def test_tapctl_multiqueue_guest_sees_four_queues(daemon: Daemon, guest_image: GuestImage) -> None:
    bridge_address(daemon)
    qemu = single_thread_tcg(
        qemu_argv(
            guest_image,
            "tap,id=n0,fds={fds}",
            ip=f"{GUEST_A}/24",
            ping=BRIDGE_ADDR,
            device=MQ_DEVICE,
            smp=4,
            extra_cmdline="tapd.pingcount=3",
        )
    )
    run = run_qemu(
        tapctl_argv(daemon, "request", "--br", "br0", "--queues", "4", "--", *qemu),
        timeout=BOOT_TIMEOUT,
    )
    assert run.returncode == 0, run.output
    assert_four_queues(run.report, run.output)
    granted = events(daemon, "request.granted")
    assert [e["queues"] for e in granted] == [4], granted
    assert_no_taps_left(daemon, "after QEMU exited")


def test_client_netdev_args_name_the_granted_fds(daemon: Daemon) -> None:
    """Not QEMU: ``netdev_args()`` says ``fd=N`` for one queue and
    ``fds=a:b:c:d`` for four, naming exactly the tap fds that arrived."""
    for queues, key in ((1, "fd"), (4, "fds")):
        grant = client.request_tap(path=daemon.socket_path, br="br0", queues=queues)
        try:
            assert len(grant.tap_fds) == queues
            assert grant.vhost_fds == []
            assert grant.netdev_args() == f"{key}=" + ":".join(map(str, grant.tap_fds))
            for fd in grant.tap_fds:
                assert os.readlink(f"/proc/self/fd/{fd}") == "/dev/net/tun"
                assert not os.get_inheritable(fd)  # the caller passes them on explicitly
        finally:
            grant.close()
        wait_until(lambda: taps(daemon.ns) == [], what="the tap to vanish with its fds")


def test_client_multiqueue_netdev_args_boot_a_four_queue_guest(
    daemon: Daemon, guest_image: GuestImage
) -> None:
    """The README's Python recipe, with a real QEMU: ``-netdev`` from ``netdev_args()``."""
    bridge_address(daemon)
    grant = client.request_tap(path=daemon.socket_path, br="br0", queues=4)
    try:
        netdev = f"tap,id=n0,{grant.netdev_args()}"
        assert netdev == "tap,id=n0,fds=" + ":".join(map(str, grant.tap_fds))
        argv = single_thread_tcg(
            qemu_argv(
                guest_image,
                netdev,
                ip=f"{GUEST_A}/24",
                ping=BRIDGE_ADDR,
                device=MQ_DEVICE,
                smp=4,
                extra_cmdline="tapd.pingcount=3",
            )
        )
        vm = Qemu(argv, pass_fds=grant.tap_fds)
    finally:
        grant.close()  # our copies; QEMU keeps its own
    with vm:
        returncode = vm.wait()
    assert returncode == 0, vm.output
    assert_four_queues(vm.report(), vm.output)
    assert_no_taps_left(daemon, "after QEMU exited")


# -- 4. two guests on one bridge ----------------------------------------------


def test_two_guests_on_one_bridge_ping_each_other(daemon: Daemon, guest_image: GuestImage) -> None:
    bridge_address(daemon)
    argv_a = qemu_argv(
        guest_image,
        "tap,id=n0,fd={fd}",
        ip=f"{GUEST_A}/24",
        ping=BRIDGE_ADDR,
        device=nic("0a"),
        extra_cmdline="tapd.listen=1",
    )
    argv_b = qemu_argv(
        guest_image,
        "tap,id=n0,fd={fd}",
        ip=f"{GUEST_B}/24",
        ping=GUEST_A,
        device=nic("0b"),
        # Both boot at once: B keeps trying until A is up (A needs a few seconds).
        extra_cmdline="tapd.pingtries=90 tapd.pingcount=3 tapd.wait=1",
    )
    request = tapctl_argv(daemon, "request", "--br", "br0", "--")
    with Qemu([*request, *argv_a]) as a, Qemu([*request, *argv_b]) as b:
        # Both NICs up: B has its pings and its wait ahead of it, A runs on.
        a.wait_for("nic")
        b.wait_for("nic")
        # tapctl exec'd QEMU, so each lease belongs to its QEMU.
        leases = tapctl_list(daemon)
        assert sorted(x["pid"] for x in leases) == sorted([a.pid, b.pid]), leases
        assert sorted(taps(daemon.ns)) == sorted(x["ifname"] for x in leases)
        assert all(links(daemon.ns)[t].get("master") == "br0" for t in taps(daemon.ns))

        report_b = b.wait_for("ping")
        assert report_b.get("ping") == "ok", f"B:\n{b.output}\nA:\n{a.output}"
        assert report_b.get("received") == "3", b.output
        assert b.wait() == 0, b.output
        assert "done" in b.report(), b.output

        report_a = a.wait_for("listen")
        assert report_a.get("ping") == "ok", a.output
        assert a.running(), a.output
        wait_until(lambda: len(taps(daemon.ns)) == 1, what="B's tap to go")
        assert [x["pid"] for x in tapctl_list(daemon)] == [a.pid]
        a.kill(signal.SIGTERM)
        a.wait(30)
    assert_no_taps_left(daemon, "after both guests are gone")


# -- 5. a bridge the policy refuses -------------------------------------------

ONLY_BR0 = """
[[allow]]
users = ["0"]
bridges = ["br0"]
"""


@pytest.fixture
def br0_only(ns: str, br0: str, tmp_path: Path) -> Iterator[Daemon]:
    """A daemon that lets root use br0 only; br1 exists too."""
    ip("-n", ns, "link", "add", "br1", "type", "bridge")
    ip("-n", ns, "link", "set", "br1", "up")
    with run_daemon(ns, tmp_path, ONLY_BR0) as d:
        yield d


def assert_denied_br1(daemon: Daemon, op: str) -> None:
    denied = events(daemon, "request.denied")
    # The denial's log line names the bridge in its message only.
    assert [e["code"] for e in denied] == ["denied"], denied
    assert DENIED_BR1 in denied[0]["message"]
    assert denied[0]["op"] == op
    assert taps(daemon.ns) == []
    assert tapctl_list(daemon) == []


@pytest.mark.parametrize("form", ["command", "path"])
def test_bridge_helper_on_a_refused_bridge_stops_qemu_with_tapds_message(
    br0_only: Daemon, guest_image: GuestImage, form: str
) -> None:
    netdev, env = helper_netdev(br0_only, form, "br1")
    argv = qemu_argv(guest_image, netdev, ip=f"{GUEST_A}/24", ping="", device=nic("05"))
    with Qemu(argv, env=env) as vm:
        returncode = vm.wait(60)
    assert returncode != 0, vm.output
    assert DENIED_BR1 in vm.output, vm.output
    assert "[denied]" in vm.output, vm.output
    assert MARKER not in vm.output, vm.output
    assert_denied_br1(br0_only, "bridge-helper")


def test_tapctl_on_a_refused_bridge_never_starts_qemu(
    br0_only: Daemon, guest_image: GuestImage, tmp_path: Path
) -> None:
    # QEMU writes a pidfile as soon as it starts: proof if it ever did.
    pidfile = tmp_path / "qemu.pid"
    qemu = qemu_argv(guest_image, "tap,id=n0,fd={fd}", ip=f"{GUEST_A}/24", ping="")
    run = run_qemu(
        tapctl_argv(br0_only, "request", "--br", "br1", "--", *qemu, "-pidfile", str(pidfile)),
        timeout=60,
    )
    assert run.returncode == 1, run.output
    assert f"tapctl: {DENIED_BR1}" in run.output, run.output
    assert run.output.rstrip().endswith("[denied]"), run.output
    assert MARKER not in run.output, run.output
    assert not pidfile.exists()
    assert_denied_br1(br0_only, "request")


# -- 6. QEMU killed mid-run ---------------------------------------------------


def test_qemu_killed_mid_run_ends_its_lease_and_tap(
    daemon: Daemon, guest_image: GuestImage
) -> None:
    bridge_address(daemon)
    qemu = qemu_argv(
        guest_image,
        "tap,id=n0,fd={fd}",
        ip=f"{GUEST_A}/24",
        ping=BRIDGE_ADDR,
        device=nic("06"),
        extra_cmdline="tapd.listen=1",
    )
    with Qemu(tapctl_argv(daemon, "request", "--br", "br0", "--", *qemu)) as vm:
        report = vm.wait_for("listen")
        assert report.get("ping") == "ok", vm.output
        (lease,) = tapctl_list(daemon)
        assert lease["pid"] == vm.pid
        assert taps(daemon.ns) == [lease["ifname"]]
        # The guest answers from the host side too, while it runs.
        ping = ip("netns", "exec", daemon.ns, *PING, "-c", "1", "-W", "2", GUEST_A, check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        vm.kill(signal.SIGKILL)
        assert vm.wait(30) == -signal.SIGKILL
    assert "done" not in vm.report(), vm.output
    assert_no_taps_left(daemon, "after QEMU was killed")
    ended = events(daemon, "lease.ended")
    assert [(e["lease"], e["reason"]) for e in ended] == [(lease["id"], "tap-removed")], ended
