"""The kernel stage: tests that must meet Debian 12's own kernel run inside it.

This machine's kernel is not the one tapd targets: it has no ``/dev/vhost-net``
and no bridge VLAN filtering.  So the tests under ``tests/kernel/`` (marked
``kernel_stage`` by tests/conftest.py; ``vhost_net`` and ``vlan_filtering``
say what a test needs) are not run by the host's pytest.  When the first of
them is due, this plugin boots Debian's cloud kernel (unpacked by
``.ci/install-e2e-deps``, as for tests/e2e/guest.py) once for the whole
session under QEMU TCG (nested KVM fails here), runs ``python -m pytest`` on
exactly the selected kernel-stage node ids inside it as root, and reports each
item's outcome into the host session under its own node id: counted in the
summary line, a failure's longrepr shown as if it had run here.  A boot failure,
a crash or a timeout inside fails every item that has no result, with the tail
of the console.

The stage: the host's root filesystem, shared read-only by ``virtiofsd``
(same interpreter, same kernel cache), and the checkout exported by a second
one at the same path (it may be on a filesystem of its own, or under ``/tmp``),
each under a tmpfs overlay for writes; fresh tmpfs on ``/run`` and ``/tmp``;
the run's script as a second archive of the initramfs; the kernel's ``/proc``, ``/sys``,
``/dev`` (with ``/dev/pts`` and ``/dev/shm``).  Before pytest starts,
``modprobe`` (kmod, against the ``modules.dep`` that ``depmod`` wrote into the
kernel cache) loads ``vhost_net``, ``tun`` and ``bridge``; the kernel loads
others (veth, nf_tables, qdiscs, 8021q) on demand through the same modprobe.
Inside, the environment is ``TAPD_KERNEL_STAGE=1`` plus ``CI`` passed through,
so CI's "no skips" rule holds there too.

Results come back over a virtio serial port (``tapd.results``) written to a
host file, one JSON line per report, apart from the kernel's console; the
stage powers off with sysrq.  QEMU and virtiofsd are killed on a timeout
(``TAPD_KSTAGE_TIMEOUT``, default 900 s), and the run directory is removed.

Costs (2 shared cores): ~4 s from QEMU's start to the shell; Python's start
under TCG is slow (pytest's own start inside takes several seconds), so tests
there should be few and do much each.  The host's summary ends with a line
giving the stage's boot, pytest and total times.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MARKER = "kernel_stage"
INSIDE = os.environ.get("TAPD_KERNEL_STAGE") == "1"
RESULTS_PORT = "tapd.results"
SAY = "TAPD-KSTAGE"

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
#: loaded by busybox insmod in the initramfs, in this order, to reach the
#: host's filesystem and the results port
INITRD_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "fuse",
    "virtiofs",
    "overlay",
    "virtio_console",
)
#: loaded by modprobe in the stage before pytest, with their dependencies
STAGE_MODULES = ("vhost_net", "tun", "bridge")
#: what the inner pytest sees of the host's environment
PASSED_ENV = ("CI", "TAPD_GUEST_CACHE", "TAPD_CHAOS_SEED")

INIT = r"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin
exec </dev/console >/dev/console 2>&1
say() { echo "TAPD-KSTAGE $*"; }
die() { say "error=$*"; echo o >/proc/sysrq-trigger; sleep 60; }
say "initrd uptime=$(cut -d' ' -f1 /proc/uptime)"
for mod in $(cat /etc/tapd-modules); do
    insmod "/lib/modules/$mod.ko" || die "insmod-$mod"
done
CHECKOUT=
for arg in $(cat /proc/cmdline); do
    case "$arg" in tapd.checkout=*) CHECKOUT="${arg#tapd.checkout=}" ;; esac
done
mkdir -p /lower /checkout /rw /newroot
mount -t virtiofs -o ro hostfs /lower || die mount-virtiofs
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir /rw/upper /rw/work /rw/ck-upper /rw/ck-work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || die mount-overlay
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
# The checkout, exported on its own: it may be on a filesystem of its own, or
# under the /tmp just hidden.  Writable as the rest is, on the tmpfs.
mount -t virtiofs -o ro checkout /checkout || die mount-checkout
mkdir -p "/newroot$CHECKOUT"
mount -t overlay -o lowerdir=/checkout,upperdir=/rw/ck-upper,workdir=/rw/ck-work overlay \
    "/newroot$CHECKOUT" || die mount-checkout-overlay
# The run's script came in the initramfs, in a second archive of its own.
cp /stage.sh /newroot/run/kstage.sh || die no-script
for fs in proc sys dev; do mount --move "/$fs" "/newroot/$fs"; done
exec chroot /newroot /bin/sh /run/kstage.sh
"""


def kernel_tree() -> tuple[Path, Path]:
    """(vmlinuz, modules dir) of the guest kernel tests/e2e/guest.py boots."""
    from guest import _default_cache_dir, _find_kernel, _kernel_root

    return _find_kernel(_kernel_root(_default_cache_dir()))


def build_initrd(moddir: Path, dest_dir: Path) -> Path:
    """The stage's initramfs: busybox, INIT and INITRD_MODULES, cached by
    content in the guest cache's initramfs directory like the e2e guest's."""
    import hashlib

    from guest import GuestError, _find_busybox, _module_files, _read_module, _write_cpio

    files = _module_files(moddir)
    missing = [m for m in INITRD_MODULES if m not in files]
    if missing:
        raise GuestError(f"kernel modules {missing} missing under {moddir}")
    busybox = _find_busybox()
    key = hashlib.sha256(INIT.encode() + str(moddir).encode())
    for name in INITRD_MODULES:
        stat = files[name].stat()
        key.update(f"\0{name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    key.update(hashlib.sha256(busybox.read_bytes()).digest())
    dest_dir.mkdir(exist_ok=True)
    initrd = dest_dir / f"kstage-{key.hexdigest()[:16]}.cpio.gz"
    if initrd.is_file():
        return initrd
    with tempfile.TemporaryDirectory(prefix="tapd-kstage-initrd-") as tmp:
        staging = Path(tmp)
        for sub in ("bin", "dev", "etc", "proc", "sys", "lib/modules"):
            (staging / sub).mkdir(parents=True)
        shutil.copy2(busybox, staging / "bin/busybox")
        (staging / "init").write_text(INIT)
        (staging / "init").chmod(0o755)
        for name in INITRD_MODULES:
            (staging / "lib/modules" / f"{name}.ko").write_bytes(_read_module(files[name]))
        (staging / "etc/tapd-modules").write_text("".join(f"{m}\n" for m in INITRD_MODULES))
        _write_cpio(staging, initrd)
    return initrd


def with_script(initrd: Path, script: str, run: Path) -> Path:
    """``initrd`` with a second archive holding ``script`` as /stage.sh (the
    kernel unpacks concatenated cpio archives, compressed or not, in turn):
    the cached initramfs stays the same from run to run, and the script needs
    no path the stage can see."""
    from guest import _write_cpio

    staging = run / "script"
    staging.mkdir()
    (staging / "stage.sh").write_text(script)
    _write_cpio(staging, run / "script.cpio.gz")
    combined = run / "initrd"
    combined.write_bytes(initrd.read_bytes() + (run / "script.cpio.gz").read_bytes())
    return combined


def stage_script(moddir: Path, rootdir: Path, nodeids: Iterable[str]) -> str:
    """What runs as root inside the stage, after the initramfs's chroot."""
    release = moddir.name
    env = [f"{k}={os.environ[k]}" for k in PASSED_ENV if k in os.environ]
    pytest_argv = [
        "env", "-i", "PATH=$PATH", "HOME=/root", "LANG=C.UTF-8", "TERM=dumb",
        "TAPD_KERNEL_STAGE=1", "TAPD_KSTAGE_RESULTS=$port", *map(shlex.quote, env),
        shlex.quote(sys.executable), "-m", "pytest", "-p", "no:cacheprovider", "--color=no",
        *map(shlex.quote, nodeids),
    ]  # fmt: skip
    if not moddir.is_file() and not (moddir / "modules.dep").is_file():
        raise FileNotFoundError(f"no modules.dep in {moddir}: run .ci/install-e2e-deps")
    return f"""#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
say() {{ echo "{SAY} $*"; }}
uptime() {{ cut -d' ' -f1 /proc/uptime; }}
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
ln -sf pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
# what udev makes on a real host (nft -f /dev/stdin, bash's <(...))
ln -sfn /proc/self/fd /dev/fd
for i in 0:stdin 1:stdout 2:stderr; do ln -sf "/proc/self/fd/${{i%%:*}}" "/dev/${{i#*:}}"; done
mkdir -p /lib/modules
ln -sfn {shlex.quote(str(moddir))} /lib/modules/{shlex.quote(release)}
echo /sbin/modprobe >/proc/sys/kernel/modprobe
modprobe -a {" ".join(STAGE_MODULES)} || say error=modprobe
ip link set lo up
port=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name")" = {RESULTS_PORT} ] && port="/dev/${{p##*/}}"
done
[ -n "$port" ] || say error=no-results-port
say "pytest uptime=$(uptime)"
cd {shlex.quote(str(rootdir))}
{" ".join(pytest_argv)}
say "exit=$? uptime=$(uptime)"
sync
echo o >/proc/sysrq-trigger
sleep 60
"""


def qemu_argv(kernel: Path, initrd: Path, run: Path, rootdir: Path) -> list[str]:
    mem = "2G"
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-m", mem, "-smp", "2",
        # vhost-user-fs needs the guest's memory shared with virtiofsd
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-numa", "node,memdev=mem",
        "-chardev", f"socket,id=vfs,path={run / 'virtiofs.sock'}",
        "-device", "vhost-user-fs-pci,chardev=vfs,tag=hostfs",
        "-chardev", f"socket,id=vck,path={run / 'checkout.sock'}",
        "-device", "vhost-user-fs-pci,chardev=vck,tag=checkout",
        "-device", "virtio-serial-pci",
        "-chardev", f"file,id=results,path={run / 'results.jsonl'}",
        "-device", f"virtserialport,chardev=results,name={RESULTS_PORT}",
        "-serial", f"file:{run / 'console.log'}",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", f"console=ttyS0 quiet loglevel=4 panic=-1 tapd.checkout={rootdir}",
    ]  # fmt: skip


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


@dataclass
class StageRun:
    """What one boot of the stage brought back."""

    reports: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    console: str = ""
    problem: str = ""  # why items without a result have none
    wall: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)  # guest uptime at each step


def boot_stage(rootdir: Path, nodeids: list[str], timeout: float) -> StageRun:
    """Boot the stage once, run ``nodeids`` inside, and collect their reports."""
    from guest import _default_cache_dir

    result = StageRun()
    start = time.monotonic()
    run = Path(tempfile.mkdtemp(prefix="tapd-kstage-"))
    virtiofsds: list[subprocess.Popen[bytes]] = []
    qemu = None
    try:
        kernel, moddir = kernel_tree()
        initrd = build_initrd(moddir, _default_cache_dir() / "initramfs")
        initrd = with_script(initrd, stage_script(moddir, rootdir, nodeids), run)
        (run / "results.jsonl").touch()
        for name, source in (("virtiofs", "/"), ("checkout", str(rootdir))):
            with open(run / f"{name}d.log", "wb") as log:
                daemon = subprocess.Popen(
                    [VIRTIOFSD, f"--socket-path={run / f'{name}.sock'}", "-o", f"source={source}",
                     "-o", "cache=none", "-o", "sandbox=chroot"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                )  # fmt: skip
            virtiofsds.append(daemon)
            while not (run / f"{name}.sock").exists():
                if daemon.poll() is not None:
                    raise RuntimeError(f"virtiofsd exited: {(run / f'{name}d.log').read_text()}")
                time.sleep(0.02)
        with open(run / "qemu.log", "wb") as log:
            qemu = subprocess.Popen(
                qemu_argv(kernel, initrd, run, rootdir),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        try:
            qemu.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            result.problem = f"the kernel stage timed out after {timeout:.0f} s"
        else:
            if qemu.returncode != 0:
                result.problem = f"QEMU exited with status {qemu.returncode}"
    except Exception as exc:
        result.problem = f"the kernel stage did not boot: {exc!r}"
    finally:
        _kill(qemu)
        for daemon in virtiofsds:
            _kill(daemon)
        result.wall = time.monotonic() - start
        for name in ("qemu.log", "virtiofsd.log", "checkoutd.log", "console.log"):
            path = run / name
            if path.is_file() and path.stat().st_size:
                text = path.read_text(errors="replace").replace("\r", "")
                result.console += text if name == "console.log" else f"[{name}]\n{text}\n"
        results = run / "results.jsonl"
        lines = results.read_text(errors="replace").splitlines() if results.is_file() else []
        shutil.rmtree(run, ignore_errors=True)
    for line in lines:
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("nodeid"), str):
            result.reports.setdefault(data["nodeid"], []).append(data)
    for line in result.console.splitlines():
        words = line.partition(SAY + " ")[2].split()
        step = words[0].partition("=")[0] if words else ""
        for word in words:
            key, _, value = word.partition("=")
            if key == "uptime":
                with contextlib.suppress(ValueError):
                    result.marks[step] = float(value)
            elif key == "error" and not result.problem:
                result.problem = f"the kernel stage failed: {word}"
    return result


class HostStage:
    """On the host: kernel-stage items run inside one boot, their reports replayed here."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.run: StageRun | None = None
        self.count = 0

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        if item.get_closest_marker(MARKER) is None:
            return None
        if os.geteuid() != 0:
            # The normal protocol: conftest's require_root skips it (fails in CI).
            return None
        if self.run is None:
            assert item.session is not None
            selected = [i.nodeid for i in item.session.items if i.get_closest_marker(MARKER)]
            self.count = len(selected)
            timeout = float(os.environ.get("TAPD_KSTAGE_TIMEOUT", "900"))
            self.run = boot_stage(self.config.rootpath, selected, timeout)
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for report in self._reports(item, self.run):
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _reports(self, item: pytest.Item, run: StageRun) -> list[pytest.TestReport]:
        hook = self.config.hook
        reports = [
            hook.pytest_report_from_serializable(config=self.config, data=data)
            for data in run.reports.get(item.nodeid, [])
        ]
        if any(r.when == "teardown" for r in reports):
            return reports
        why = run.problem or "the kernel stage ended before this test finished"
        tail = "\n".join(run.console.splitlines()[-120:])
        failed = pytest.TestReport(
            item.nodeid, item.location, {}, "failed",
            f"{why}\n--- the stage's console (last lines) ---\n{tail}", "call",
        )  # fmt: skip
        return [*reports, failed] if reports else [failed]

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        run = self.run
        if run is None:
            return
        marks = run.marks
        pytest_s = marks.get("exit", 0.0) - marks.get("pytest", 0.0)
        terminalreporter.write_line(
            f"kernel stage: {self.count} tests, shell after {marks.get('pytest', 0.0):.1f} s "
            f"of guest uptime, pytest inside {pytest_s:.1f} s, {run.wall:.1f} s wall in all"
        )


class InsideStage:
    """In the stage: every report goes to the host as one JSON line."""

    def __init__(self, config: pytest.Config, port: str) -> None:
        self.config = config
        self.out = open(port, "w", encoding="utf-8")  # noqa: SIM115 - closed at unconfigure

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self.out.write(json.dumps(data) + "\n")
        self.out.flush()

    def pytest_unconfigure(self) -> None:
        self.out.close()


def configure(config: pytest.Config) -> None:
    """Called from tests/conftest.py's pytest_configure."""
    if INSIDE:
        port = os.environ.get("TAPD_KSTAGE_RESULTS")
        if port:
            config.pluginmanager.register(InsideStage(config, port), "kstage-inside")
    else:
        config.pluginmanager.register(HostStage(config), "kstage-host")
