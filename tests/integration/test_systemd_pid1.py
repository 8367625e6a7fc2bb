"""tapd as an administrator runs it: installed by the README's own systemd
block, from a clone under /root, under a real systemd as PID 1.

systemd boots in a ``systemd-nspawn`` container over the host's ``/usr`` (see
FACTS.md, "systemd as PID 1, in a container"): a tmpfs root, its own network
namespace, writable overlays of ``/etc`` and ``/usr/local`` whose upper halves
are this test's.  pip has no network in there, so the wheels of tapd's
dependencies are built beforehand and bound in at ``/wheels``.

The tests share one container and run in order; each leaves tapd serving the
example configuration again.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tapdtest import wait_until

REPO = Path(__file__).resolve().parents[2]
#: where the README's block runs: ProtectHome=yes hides it from tapd.service
CLONE = "/root/tapd"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: the unprivileged VM user, in group kvm
VM_USER = "vmuser"
CONFIG = "/etc/tapd/tapd.toml"


def readme_block(section: str, nth: int = 0) -> str:
    """The ``nth`` fenced block of a README section, as an admin copies it."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```$", body, flags=re.M | re.S)
    return str(blocks[nth])


def build_wheels(into: Path) -> None:
    """tapd's dependencies and build backend as wheels, for pip offline."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = [*project["project"]["dependencies"], *project["build-system"]["requires"], "wheel"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(into), *wanted],
        check=True,
        capture_output=True,
    )


def checkout_tar() -> bytes:
    """The working tree as git sees it (tracked and new files, nothing ignored)."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name in sorted({n.decode() for n in names if n}):
            if (REPO / name).exists():
                tar.add(REPO / name, arcname=name, recursive=False)
    return out.getvalue()


class Machine:
    """A booted container, entered with nsenter (no machined needed)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        for upper in ("etc", "local"):
            (workdir / upper).mkdir()
        self.wheels = workdir / "wheels"
        build_wheels(self.wheels)
        self.log = open(workdir / "console.log", "wb")  # noqa: SIM115
        # `timeout` is the net under everything: should this process die, the
        # container gets SIGTERM (a clean poweroff, systemd-nspawn(1)) anyway.
        self.nspawn = subprocess.Popen(
            [
                "timeout", "600", "systemd-nspawn", "--register=no", "--keep-unit",
                "--volatile=yes", "-D", "/", f"--machine=tapd-{os.urandom(3).hex()}",
                "--private-network", "--system-call-filter=bpf",
                f"--overlay=/etc:{workdir}/etc:/etc",
                f"--overlay=/usr/local:{workdir}/local:/usr/local",
                f"--bind-ro={self.wheels}:/wheels",
                "--rlimit=RLIMIT_NOFILE=1024:20000", "-b", "--console=pipe",
                "systemd.mask=postgresql.service",
            ],
            env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.pid1 = 0
        wait_until(self._found_pid1, timeout=30, what="the container's systemd")
        wait_until(self._booted, timeout=60, what="the container to finish booting")

    def _booted(self) -> bool:
        # Until its bus is up, systemctl cannot even ask; then --wait waits.
        state = self.run("systemctl", "is-system-running", "--wait", check=False).stdout
        return state.strip() in ("running", "degraded")

    def _found_pid1(self) -> bool:
        """The container's PID 1: the systemd that systemd-nspawn forked."""
        if self.nspawn.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited: {self.console()}")
        for pid in _descendants(self.nspawn.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    self.pid1 = pid
                    return True
        return False

    def console(self) -> str:
        return (self.workdir / "console.log").read_text(errors="replace")[-3000:]

    def run(
        self,
        *argv: str,
        user: str | None = None,
        check: bool = True,
        input: bytes | str | None = None,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        environ = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        prefix = ["nsenter", "-t", str(self.pid1), "-m", "-u", "-i", "-n", "-p", "-C", "--"]
        prefix += ["env", "-i", *(f"{k}={v}" for k, v in environ.items())]
        if user is not None:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        done = subprocess.run(
            [*prefix, *argv],
            input=input.encode() if isinstance(input, str) else input,
            capture_output=True,
            timeout=timeout,
        )
        result = subprocess.CompletedProcess(
            done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run("bash", "-euo", "pipefail", "-c", script, **kw)

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-c", f"mkdir -p \"$(dirname '{path}')\" && cat >'{path}'", input=text)

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-P", prop, unit).stdout.strip()

    def poweroff(self) -> None:
        if self.nspawn.poll() is None and self.pid1:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.run("systemctl", "poweroff", check=False, timeout=10)
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                # Killing PID 1 of a PID namespace kills everything in it.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid1, signal.SIGKILL)
                self.nspawn.wait(timeout=30)
        self.log.close()


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
                todo += [int(c) for c in children]
                out += [int(c) for c in children]
    return out


@pytest.fixture(scope="module")
def box() -> Iterator[Machine]:
    assert shutil.which("systemd-nspawn"), "systemd-nspawn comes from systemd-container"
    # Short, so that overlay options and socket paths stay well within limits.
    workdir = Path(tempfile.mkdtemp(prefix="tapd-pid1-"))
    machine: Machine | None = None
    try:
        machine = Machine(workdir)
        install(machine)
        yield machine
    finally:
        if machine is not None:
            machine.poweroff()
        shutil.rmtree(workdir, ignore_errors=True)


def install(box: Machine) -> None:
    """A clean clone in /root, and the README's block run there, verbatim."""
    box.run("mkdir", "-p", CLONE)
    box.run("tar", "-x", "-C", CLONE, input=checkout_tar())
    run_the_install_block(box)
    # The VMs' side: a bridge, and a user who may use /dev/kvm.
    box.run("ip", "link", "add", "br0", "type", "bridge")
    box.run("ip", "link", "set", "br0", "up")
    box.run("useradd", "--system", "--no-create-home", "-G", "kvm", VM_USER)


# -- helpers that speak for the admin and the VM user ------------------------


def run_the_install_block(box: Machine) -> None:
    """As an admin pastes it (each line must succeed), in the clone.  pip
    reads the bound wheels; the block itself is the plain command."""
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/wheels", "PIP_CONFIG_FILE": "/dev/null"}
    script = f"cd {CLONE}\n" + readme_block("systemd")
    box.run("bash", "-euo", "pipefail", "-c", script, env=offline, timeout=240)


def tapctl(box: Machine, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return box.run("tapctl", *args, user=VM_USER, check=check)


def tap_names(box: Machine) -> list[str]:
    links = json.loads(box.run("ip", "-d", "-j", "link", "show").stdout)
    return [link["ifname"] for link in links if link.get("linkinfo", {}).get("info_kind") == "tun"]


def root_leases(box: Machine) -> list[dict[str, Any]]:
    return list(json.loads(box.run("tapctl", "list", "--json").stdout))


def main_pid(box: Machine) -> int:
    return int(box.show("tapd.service", "MainPID"))


def journal(box: Machine, *args: str) -> str:
    return box.run("journalctl", "-u", "tapd", "-o", "cat", "--no-pager", *args).stdout


def restore_example(box: Machine) -> None:
    box.run("install", "-m", "0644", f"{CLONE}/config/tapd.toml", CONFIG)
    # A tapd that is not running starts on the next connection, with this file.
    box.run("systemctl", "try-reload-or-restart", "tapd")


# -- the checks ---------------------------------------------------------------


def test_the_readme_installs_a_socket_activated_tapd_from_a_clone_under_root(
    box: Machine,
) -> None:
    assert box.show("tapd.socket", "ActiveState") == "active"
    assert box.show("tapd.socket", "UnitFileState") == "enabled"
    assert box.show("tapd.service", "ActiveState") == "inactive", "started before any client"
    stat = box.run("stat", "-c", "%a %G %F", "/run/tapd.sock").stdout.split(maxsplit=2)
    assert stat == ["660", "kvm", "socket\n"]
    # Every program on the user's default PATH, runnable by that user.
    for program in ("tapd", "tapctl", "tapd-bridge-helper"):
        where = box.run("sh", "-c", f"command -v {program}", user=VM_USER).stdout.strip()
        assert where == f"/usr/local/bin/{program}"
    assert "tapd " in box.run("tapd", "--version", user=VM_USER).stdout
    # Documentation= names what the install put in place.
    docs = [doc.strip('"') for doc in box.show("tapd.service", "Documentation").split()]
    assert docs == ["man:tapd(8)", "man:tapd.toml(5)", "man:tapctl(1)"]
    pages = (("8", "tapd"), ("5", "tapd.toml"), ("1", "tapctl"))
    for section, page in (*pages, ("7", "tapd-protocol"), ("7", "tapd-security")):
        found = box.run("man", "-w", section, page).stdout.strip()
        where = box.run("readlink", "-f", found).stdout.strip()
        assert where == f"/usr/local/share/man/man{section}/{page}.{section}"
    assert box.run("cat", CONFIG).stdout == (REPO / "config/tapd.toml").read_text()


def test_a_kvm_user_s_first_connection_starts_tapd_and_every_verb_answers(box: Machine) -> None:
    granted = json.loads(tapctl(box, "request", "--json", "--br", "br0").stdout)
    assert granted["ok"] is True and granted["bridge"] == "br0"
    assert box.show("tapd.service", "ActiveState") == "active"
    assert json.loads(tapctl(box, "hello", "--json").stdout)["version"]
    assert tapctl(box, "hello").stdout.startswith("tapd ")
    for verb in (("list",), ("list", "--json"), ("status",), ("status", "--json")):
        assert tapctl(box, *verb).returncode == 0
    # release: of a lease the user holds, while its holder still runs.
    box.run(
        "systemd-run", f"--uid={VM_USER}", "--unit=vm-release", "--",
        "/usr/local/bin/tapctl", "request", "--br", "br0", "--", "sleep", "infinity",
    )  # fmt: skip
    try:
        wait_until(lambda: len(json.loads(tapctl(box, "list", "--json").stdout)) == 1)
        lease = json.loads(tapctl(box, "list", "--json").stdout)[0]
        tapctl(box, "release", lease["id"])
        wait_until(lambda: tap_names(box) == [], what="the released tap to go")
    finally:
        box.run("systemctl", "stop", "vm-release", check=False)
    # helper: QEMU's protocol, the tap's fd sent back on the fd it names.
    for helper in (["/usr/local/bin/tapd-bridge-helper"], ["/usr/local/bin/tapctl", "helper"]):
        got = box.run("/usr/bin/python3", "-c", HELPER_AS_QEMU, *helper, user=VM_USER)
        assert got.stdout.strip() == "fd received", got.stderr


#: what QEMU's net_bridge_run_helper does: a socketpair, the helper run with
#: --use-vnet --fd=N --br=BR, one byte with the tap's fd in SCM_RIGHTS back
HELPER_AS_QEMU = """
import os, socket, subprocess, sys
ours, theirs = socket.socketpair()
subprocess.run([*sys.argv[1:], "--use-vnet", f"--fd={theirs.fileno()}", "--br=br0"],
               pass_fds=[theirs.fileno()], check=True)
msg, fds, _, _ = socket.recv_fds(ours, 1, 1)
(fd,) = fds
os.fstat(fd)
print("fd received")
"""


def test_a_held_tap_survives_restart_and_sigkill_and_goes_with_its_holder(
    box: Machine,
) -> None:
    box.run(
        "systemd-run", f"--uid={VM_USER}", "--unit=vm-holder", "--",
        "/usr/local/bin/tapctl", "request", "--br", "br0", "--", "sleep", "infinity",
    )  # fmt: skip
    try:
        wait_until(lambda: len(tap_names(box)) == 1, what="the holder's tap")
        (tap,) = tap_names(box)
        wait_until(
            lambda: box.show("tapd.service", "StatusText") == "serving, 1 lease",
            what="STATUS= to count the lease",
        )
        box.run("systemctl", "restart", "tapd")
        assert tap_names(box) == [tap]
        assert [lease["ifname"] for lease in root_leases(box)] == [tap]
        before = main_pid(box)
        box.run("systemctl", "kill", "-s", "KILL", "tapd")
        wait_until(
            lambda: (
                main_pid(box) not in (0, before)
                and box.show("tapd.service", "ActiveState") == "active"
            ),
            timeout=20,
            what="systemd to restart the killed tapd",
        )
        assert tap_names(box) == [tap]
        assert [lease["ifname"] for lease in root_leases(box)] == [tap]
    finally:
        box.run("systemctl", "stop", "vm-holder", check=False)
    wait_until(lambda: tap_names(box) == [], what="the tap to go with its holder")
    wait_until(lambda: root_leases(box) == [], what="the lease to end")
    wait_until(
        lambda: box.show("tapd.service", "StatusText") == "serving, 0 leases",
        what="STATUS= to follow",
    )


def test_reload_fails_on_a_bad_file_and_keeps_the_policy(box: Machine) -> None:
    tapctl(box, "request", "--json", "--br", "br0")  # started, on the example policy
    pid = main_pid(box)
    good = box.run("cat", CONFIG).stdout
    box.write(CONFIG, good + '\n[[allow]]\nbridges = ["*"]\ngroups = ["kvm"]\nbridgez = ["br1"]\n')
    try:
        reload = box.run("systemctl", "reload", "tapd", check=False)
        assert reload.returncode != 0
        errors = journal(box, "-p", "err")
        assert f"{CONFIG}: allow[2].bridgez" in errors
        assert main_pid(box) == pid
        assert json.loads(tapctl(box, "request", "--json", "--br", "br0").stdout)["ok"] is True
        # A good file that takes br0 away is applied: the reload did reach tapd.
        box.write(CONFIG, good.replace('bridges = ["br0"]', 'bridges = ["br1"]'))
        box.run("systemctl", "reload", "tapd")
        denied = tapctl(box, "request", "--json", "--br", "br0", check=False)
        assert denied.returncode != 0 and "denied" in denied.stderr
    finally:
        restore_example(box)
    assert json.loads(tapctl(box, "request", "--json", "--br", "br0").stdout)["ok"] is True


def test_warnings_reach_the_journal_ranked_and_the_helper_drop_in_works(
    box: Machine,
) -> None:
    good = box.run("cat", CONFIG).stdout
    box.write(
        CONFIG,
        good.replace("helpers = {}", 'helpers = { qemu = "/usr/lib/qemu/qemu-bridge-helper" }'),
    )
    box.run("systemctl", "reload", "tapd")
    try:
        # Under the bare unit the helper has no AF_INET: a failure of the
        # system's, logged as a warning.
        failed = tapctl(box, "request", "--json", "--br", "br0", "--helper", "qemu", check=False)
        assert failed.returncode != 0 and "helper-failed" in failed.stderr
        ranked = [json.loads(line) for line in journal(box, "-p", "warning").splitlines()
                  if line.startswith("{")]  # fmt: skip
        assert any(e["event"] == "request.failed" and e["code"] == "helper-failed"
                   for e in ranked)  # fmt: skip
        assert all(e["level"] in ("warning", "error", "critical") for e in ranked)
        # The README's drop-in, as written there, makes it work.
        box.sh(readme_block("systemd", 1))
        granted = json.loads(
            tapctl(box, "request", "--json", "--br", "br0", "--helper", "qemu").stdout
        )
        assert granted["ok"] is True and granted["bridge"] == "br0"
    finally:
        box.run("rm", "-f", "/etc/systemd/system/tapd.service.d/helper.conf")
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "restart", "tapd")
        restore_example(box)


def test_the_watchdog_keeps_a_live_tapd_and_restarts_a_stopped_one(box: Machine) -> None:
    box.write("/etc/systemd/system/tapd.service.d/watchdog.conf", "[Service]\nWatchdogSec=2\n")
    try:
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "restart", "tapd")
        pid, restarts = main_pid(box), box.show("tapd.service", "NRestarts")
        # Not a speed test: only that pings keep coming past 2x WatchdogSec.
        time.sleep(5)
        assert (main_pid(box), box.show("tapd.service", "NRestarts")) == (pid, restarts)
        box.run("kill", "-STOP", str(pid))
        wait_until(
            lambda: (
                main_pid(box) not in (0, pid)
                and box.show("tapd.service", "ActiveState") == "active"
            ),
            timeout=30,
            what="the watchdog to restart a stopped tapd",
        )
        assert "watchdog" in box.show("tapd.service", "Result") or int(
            box.show("tapd.service", "NRestarts")
        ) > int(restarts)
        assert json.loads(tapctl(box, "request", "--json", "--br", "br0").stdout)["ok"] is True
    finally:
        box.run("rm", "-f", "/etc/systemd/system/tapd.service.d/watchdog.conf")
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "restart", "tapd")


def test_a_bad_file_at_start_is_reported_once_and_keeps_the_socket(box: Machine) -> None:
    box.run("systemctl", "stop", "tapd")
    restarts = box.show("tapd.service", "NRestarts")
    good = box.run("cat", CONFIG).stdout
    box.write(CONFIG, good.replace('groups = ["kvm"]', 'groups = ["kvmm"]'))
    try:
        for _ in range(8):  # more than StartLimitBurst: nothing is retried
            refused = tapctl(box, "request", "--json", "--br", "br0", check=False)
            assert refused.returncode != 0 and "config-invalid" in refused.stderr
        assert box.show("tapd.socket", "ActiveState") == "active"
        assert box.show("tapd.service", "ActiveState") == "active"
        assert box.show("tapd.service", "NRestarts") == restarts
        status = box.run("systemctl", "status", "tapd", "--no-pager", check=False).stdout
        assert f"{CONFIG}: allow[1].groups" in status and "kvmm" in status
        assert "systemctl reload tapd" in status
        run = f"_SYSTEMD_INVOCATION_ID={box.show('tapd.service', 'InvocationID')}"
        invalid = [line for line in box.run("journalctl", "-o", "cat", "-p", "err", run).stdout
                   .splitlines() if '"config.invalid"' in line]  # fmt: skip
        assert len(invalid) == 1, invalid
        box.write(CONFIG, good)
        box.run("systemctl", "reload", "tapd")
        assert json.loads(tapctl(box, "request", "--json", "--br", "br0").stdout)["ok"] is True
    finally:
        restore_example(box)


def test_the_socket_file_goes_with_the_socket(box: Machine) -> None:
    box.run("systemctl", "stop", "tapd.socket")
    try:
        assert box.run("test", "-e", "/run/tapd.sock", check=False).returncode == 1
        assert box.show("tapd.service", "ActiveState") == "inactive"
    finally:
        box.run("systemctl", "start", "tapd.socket")
    assert json.loads(tapctl(box, "request", "--json", "--br", "br0").stdout)["ok"] is True


def test_systemd_analyze_security_rates_the_unit_2_or_better(box: Machine) -> None:
    out = box.run("systemd-analyze", "security", "--no-pager", "tapd.service").stdout
    found = re.search(r"Overall exposure level for tapd\.service: (\d+\.\d+)", out)
    assert found, out[-500:]
    assert float(found.group(1)) <= 2.0, out


def test_running_the_block_again_upgrades_and_keeps_the_admin_s_file(box: Machine) -> None:
    edited = box.run("cat", CONFIG).stdout + "# the admin's own line\n"
    box.write(CONFIG, edited)
    try:
        box.run("systemctl", "restart", "tapd")
        pid = main_pid(box)
        run_the_install_block(box)
        assert box.run("cat", CONFIG).stdout == edited
        assert main_pid(box) not in (0, pid), "the upgrade restarts a running tapd"
        assert json.loads(tapctl(box, "request", "--json", "--br", "br0").stdout)["ok"] is True
    finally:
        restore_example(box)
