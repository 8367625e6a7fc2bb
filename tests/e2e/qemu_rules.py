"""Ask a real QEMU which ``netdev_add`` tap options ``net_init_tap()`` refuses.

:class:`QemuJudge` runs ``qemu-system-x86_64 -machine none`` (no guest, no
KVM) inside a throwaway network namespace, talks QMP to it over a UNIX socket,
and answers, for one ``NetdevTapOptions`` dict at a time, what QEMU made of a
``netdev_add`` of type ``tap`` with exactly those options.  Every tap QEMU
creates lives in that namespace, which is deleted afterwards.

So that QEMU gets past its option rules whenever they allow it (and a later
failure cannot hide a rule), the options name real resources:

* fd names (``fd``, ``fds``, ``vhostfd``, ``vhostfds``) are registered with
  QMP ``getfd`` right before each ``netdev_add``, carrying real tap fds (made in
  the namespace) or, for vhost, an fd of ``/dev/null`` that vhost refuses, so
  the result never depends on whether the host has ``/dev/vhost-net``;
* :attr:`QemuJudge.helper` is a working bridge helper: it makes a tap in the
  namespace and hands it to QEMU the way ``qemu-bridge-helper`` does.

A rule refusal is an error whose ``desc`` is one of :data:`RULE_MESSAGES`;
anything else (success, or a failure after the rules) means the options passed
the rules.  Failures after the rules must be ones :meth:`QemuOutcome.explained`
knows, so a QEMU whose wording or rules changed shows up as unexplained rather
than as a silent "passes".  QEMU 7.2 aborts (``net_client_init1: Assertion
`nc' failed``) when vhost cannot start and ``vhostforce`` is off: that too
happens after the rules, and the judge restarts QEMU and carries on.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tapdtest import netns

from tapd import tun

QEMU = "qemu-system-x86_64"

#: Every message net_init_tap() (net/tap.c, QEMU 7.2) refuses a combination of
#: options with, including the one net_init_tap_one() adds for vhostfd(s)= with
#: vhost=off.  "Multiqueue tap cannot be used with hubs" is left out: it needs
#: a hub peer, which netdev_add never has.
RULE_MESSAGES: frozenset[str] = frozenset(
    {
        "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, fds=, "
        "and vhostfds= are invalid with fd=",
        "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, "
        "and vhostfd= are invalid with fds=",
        "The number of fds passed does not match the number of vhostfds passed",
        "ifname=, script=, downscript=, vnet_hdr=, queues=, and vhostfds= are invalid with helper=",
        "vhostfds= is invalid if fds= wasn't specified",
        "vhostfd(s)= is not valid without vhost",
    }
)

#: Failures QEMU may report *after* its rules with the resources this module
#: provides: vhost cannot start on a /dev/null fd, nor without /dev/vhost-net;
#: and tap_open() itself can fail when workers sharing the namespace race for
#: a "tap%d" name that another worker's queue is attaching to (EINVAL).
LATER_ERRORS: tuple[re.Pattern[str], ...] = (
    re.compile(r"vhost-net requested but could not be initialized"),
    re.compile(r"tap: open vhost char device failed(: .*)?"),
    re.compile(r"could not configure /dev/net/tun \(tap\d+\): Invalid argument"),
)

#: QEMU 7.2's net_client_init1() asserts that net_init_tap() left a netdev
#: behind.  It did not when vhost failed without vhostforce=on (QEMU then
#: deletes the tap and carries on), nor for zero queues (fds="", queues=0).  A
#: death with this on stderr happened after the rules.
LATER_DEATHS: tuple[re.Pattern[str], ...] = (re.compile(r"Assertion `nc' failed"),)

#: fd names a combination may use, and what each stands for.
TAP_FD_NAMES = ("tf", "tq0", "tq1", "tq2")
VHOST_FD_NAMES = ("vf", "vq0", "vq1", "vq2")

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread that has joined network namespace ``ns``.

    setns(CLONE_NEWNET) changes only the calling thread, and a tun fd belongs
    to the namespace it was opened in, so a tap made here lives in ``ns``.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            nsfd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(nsfd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
            finally:
                os.close(nsfd)
            result.append(fn())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"setns-{ns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def make_fds(ns: str) -> dict[str, int]:
    """One tap fd (in ``ns``) per :data:`TAP_FD_NAMES`, one /dev/null fd per
    :data:`VHOST_FD_NAMES`.  All taps have IFF_VNET_HDR, as QEMU wants every fd
    of one ``fds=`` alike."""

    def taps() -> dict[str, int]:
        made: dict[str, int] = {}
        try:
            for name in TAP_FD_NAMES:
                made[name] = tun.create_tap(f"qr-{name}", vnet_hdr=True)[0]
        except BaseException:
            tun.close_all(made.values())
            raise
        return made

    fds = in_netns(ns, taps)
    for name in VHOST_FD_NAMES:
        fds[name] = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return fds


HELPER_SOURCE = """\
#!{python} -IS
# A bridge helper as QEMU runs it: HELPER --use-vnet --fd=N --br=BR.  It makes
# a tap (in QEMU's network namespace) and sends it over fd N with SCM_RIGHTS.
import array, fcntl, os, socket, struct, sys
args = sys.argv[1:]
sock = socket.socket(fileno=int(next(a[5:] for a in args if a.startswith("--fd="))))
flags = 0x0002 | 0x1000 | (0x4000 if "--use-vnet" in args else 0)  # TAP|NO_PI|VNET_HDR
tap = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(tap, 0x400454CA, struct.pack("16sH22x", b"", flags))  # TUNSETIFF
sock.sendmsg([b"\\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [tap]))])
"""


def write_helper(path: Path) -> str:
    path.write_text(HELPER_SOURCE.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def fd_names(opts: Mapping[str, Any]) -> list[str]:
    """The registered fd names ``opts`` refers to, each once, in order."""
    names: list[str] = []
    for key in ("fd", "fds", "vhostfd", "vhostfds"):
        value = opts.get(key)
        if isinstance(value, str):
            for name in value.split(":"):
                if name in TAP_FD_NAMES + VHOST_FD_NAMES and name not in names:
                    names.append(name)
    return names


@dataclass(frozen=True)
class QemuOutcome:
    """What one ``netdev_add`` did."""

    ok: bool  # QEMU returned success
    desc: str | None = None  # the error's desc when it did not
    died: bool = False  # QEMU died handling it
    stderr: str = ""  # what QEMU printed on stderr meanwhile

    @property
    def rule(self) -> str | None:
        """The rule message QEMU refused with, or None if the rules passed."""
        return self.desc if self.desc in RULE_MESSAGES else None

    @property
    def failed_later(self) -> bool:
        return not self.ok and self.rule is None

    def explained(self, also: Sequence[str] = ()) -> bool:
        """Whether a failure after the rules is one this module expects (or
        one of the regular expressions ``also``)."""
        if self.ok or self.rule is not None:
            return True
        if self.died:
            return any(p.search(self.stderr) for p in LATER_DEATHS)
        patterns = [*LATER_ERRORS, *(re.compile(a) for a in also)]
        return self.desc is not None and any(p.fullmatch(self.desc) for p in patterns)

    def describe(self) -> str:
        if self.ok:
            return "success"
        if self.died:
            last = self.stderr.strip().splitlines()[-1:] or ["(nothing on stderr)"]
            return f"QEMU died: {last[0]}"
        return f"error: {self.desc}"


class QemuDied(Exception):
    pass


class Qemu:
    """One QEMU process with a QMP connection, in network namespace ``ns``."""

    def __init__(self, ns: str, workdir: Path, tag: str, timeout: float = 10.0) -> None:
        self.ns = ns
        self.workdir = workdir
        self.tag = tag
        self.timeout = timeout
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.log_path = workdir / f"qemu-{tag}.log"
        self._buf = b""
        self._next_id = 0
        self.version = ""

    # -- process ------------------------------------------------------------------

    def start(self) -> None:
        self.starts += 1
        # QEMU gets one end of a connected socket pair as its QMP chardev: no
        # listening socket, so nothing to race with its start-up (it blocks in
        # accept() now and then when handed a listening one).
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [
            "ip", "netns", "exec", self.ns,
            QEMU, "-machine", "none", "-nodefaults", "-display", "none",
            "-chardev", f"socket,id=qmp,fd={theirs.fileno()}",
            "-mon", "chardev=qmp,mode=control",
        ]  # fmt: skip
        with theirs, open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        ours.settimeout(self.timeout)
        self.sock = ours
        self._buf = b""
        greeting = self._read()
        while "QMP" not in greeting:  # an event (RESUME) may come first
            greeting = self._read()
        qemu = greeting["QMP"]["version"]["qemu"]
        self.version = f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}"
        self.command("qmp_capabilities")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.sock is not None:
            with contextlib.suppress(OSError, QemuDied):
                self.command("quit")
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def wait_dead(self, timeout: float = 5.0) -> bool:
        """After QMP broke: whether QEMU exited (False: it hung, and was killed)."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return False

    def restart(self) -> None:
        self.stop()
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.sock is not None

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    # -- QMP ------------------------------------------------------------------------

    def _read(self) -> dict[str, Any]:
        assert self.sock is not None
        while b"\n" not in self._buf:
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError) as exc:
                raise QemuDied(str(exc)) from None
            if not data:
                raise QemuDied("QMP connection closed")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        obj: dict[str, Any] = json.loads(line)
        return obj

    def command(
        self, execute: str, arguments: Mapping[str, Any] | None = None, fds: Sequence[int] = ()
    ) -> dict[str, Any]:
        """Run one QMP command; its reply (with "return" or "error")."""
        assert self.sock is not None
        self._next_id += 1
        msg: dict[str, Any] = {"execute": execute, "id": self._next_id}
        if arguments is not None:
            msg["arguments"] = dict(arguments)
        data = json.dumps(msg).encode() + b"\n"
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        try:
            self.sock.sendmsg([data], anc)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise QemuDied(str(exc)) from None
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                return reply
            # events (and nothing else) arrive unasked; skip them


class QemuJudge:
    """Answers ``netdev_add`` outcomes from real QEMUs in a namespace of their own.

    Use as a context manager; :meth:`judge` takes a list of option dicts (each
    a ``NetdevTapOptions`` without ``type`` or ``id``) and spreads them over
    ``workers`` QEMU processes.
    """

    def __init__(self, workers: int = 4) -> None:
        self.workers = workers
        self._stack = contextlib.ExitStack()
        self.ns = ""
        self.workdir = Path()
        self.helper = ""
        self.fds: dict[str, int] = {}
        self.restarts = 0
        self.version = ""

    def __enter__(self) -> QemuJudge:
        if shutil.which(QEMU) is None:
            raise RuntimeError(f"{QEMU} is not installed; run .ci/install-e2e-deps")
        try:
            # sun_path holds 107 bytes: keep the sockets under a short directory.
            self.workdir = Path(tempfile.mkdtemp(prefix="tapd-qr-"))
            self._stack.callback(shutil.rmtree, self.workdir, True)
            self.ns = self._stack.enter_context(netns(prefix="tapd-qr-"))
            self.fds = make_fds(self.ns)
            self._stack.callback(tun.close_all, list(self.fds.values()))
            self.helper = write_helper(self.workdir / "bridge-helper")
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.workdir.glob("qemu-*.log"))

    def judge(self, cases: Sequence[Mapping[str, Any]]) -> list[QemuOutcome]:
        outcomes: list[QemuOutcome | None] = [None] * len(cases)
        lock = threading.Lock()

        def work(worker: int) -> None:
            qemu = Qemu(self.ns, self.workdir, str(worker))
            qemu.start()
            with lock:
                self.version = qemu.version
            try:
                for index in range(worker, len(cases), self.workers):
                    outcomes[index] = self._one(qemu, f"q{index}", cases[index])
            finally:
                qemu.stop()
                with lock:
                    self.restarts += qemu.starts - 1

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for future in [pool.submit(work, w) for w in range(self.workers)]:
                future.result()
        done = [o for o in outcomes if o is not None]
        assert len(done) == len(cases)
        return done

    def _one(self, qemu: Qemu, netdev_id: str, opts: Mapping[str, Any]) -> QemuOutcome:
        for attempt in range(2):
            if not qemu.alive():
                qemu.restart()
            try:
                for name in fd_names(opts):
                    reply = qemu.command("getfd", {"fdname": name}, fds=[self.fds[name]])
                    if "error" in reply:
                        raise RuntimeError(f"getfd {name}: {reply['error']}")
            except QemuDied:
                qemu.restart()
                if attempt:
                    raise
                continue
            offset = qemu.log_size()
            try:
                reply = qemu.command("netdev_add", {"type": "tap", "id": netdev_id, **opts})
            except QemuDied as exc:
                exited = qemu.wait_dead()
                stderr = qemu.log_since(offset)
                if not exited:
                    stderr += f"\n(QMP: {exc}; QEMU hung and was killed)"
                qemu.restart()
                return QemuOutcome(ok=False, died=True, stderr=stderr)
            if "error" in reply:
                return QemuOutcome(
                    ok=False, desc=reply["error"]["desc"], stderr=qemu.log_since(offset)
                )
            outcome = QemuOutcome(ok=True, stderr=qemu.log_since(offset))
            try:
                # It may have made no netdev at all (fds="" or queues=0): ignore errors.
                qemu.command("netdev_del", {"id": netdev_id})
            except QemuDied:
                qemu.restart()
            return outcome
        raise AssertionError("unreachable")
