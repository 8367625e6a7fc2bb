"""libvirt's session mode (what virt-manager and GNOME Boxes use for an
unprivileged user) with tapd's helper as its ``bridge_helper``.

An unprivileged user's ``virsh -c qemu:///session`` autospawns the user's own
libvirtd, which runs the helper named in ``$XDG_CONFIG_HOME/libvirt/qemu.conf``
for every ``<interface type='bridge'>`` and hands the tap to QEMU.  libvirtd
cleans the helper's environment, so the helper finds tapd through the
system-wide client setting, ``/etc/tapd/client.conf``: here a private mount
namespace puts the test's own over ``/etc/tapd``, leaving the host's alone.
Everything runs in the test's network namespace, where tapd makes its taps.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from asuser import as_user, ensure_user, private_dir, readable_copy
from guest import GuestImage, parse_guest_output
from tapdtest import Daemon, ip, run_daemon, taps, wait_until

BRIDGE_ADDR = "10.77.6.1"
GUEST_ADDR = "10.77.6.2"
DOMAIN = "tapd-e2e-vm"


@dataclass
class Session:
    """One user's libvirt session, reached through virsh in the test's
    namespaces."""

    ns: str
    root: Path  # the test's private tree: etc/, xdg/, guest files, console log
    env: dict[str, str]

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # The test's etc/tapd over /etc/tapd, in a mount namespace of this
        # call's own: the session daemon virsh may spawn inherits it.
        script = 'mount --bind "$1" /etc/tapd && shift && exec "$@"'
        argv = [
            "ip", "netns", "exec", self.ns,
            "unshare", "--mount", "--propagation", "private",
            "sh", "-c", script, "sh", str(self.root / "etc/tapd"),
            *as_user("virsh", "-q", "-c", "qemu:///session", *args, env=self.env),
        ]  # fmt: skip
        run = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd="/")
        if check and run.returncode:
            raise AssertionError(f"virsh {' '.join(args)}: {run.stdout}{run.stderr}")
        return run

    def console(self) -> str:
        path = self.root / "guest/console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def daemon_pids(self) -> list[int]:
        run = subprocess.run(
            ["pgrep", "-u", ensure_user().pw_name, "-x", "libvirtd"],
            capture_output=True,
            text=True,
        )
        return [int(pid) for pid in run.stdout.split()]


def domain_xml(session: Session, image: GuestImage, bridge: str) -> Path:
    guest = session.root / "guest"
    kernel, initrd = readable_copy([image.kernel, image.initrd], guest)
    cmdline = (
        f"console=ttyS0 quiet panic=-1 tapd.ip={GUEST_ADDR}/24 tapd.ping={BRIDGE_ADDR} "
        "tapd.listen=1"
    )
    xml = guest / f"{bridge}.xml"
    xml.write_text(f"""<domain type='qemu'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <interface type='bridge'>
      <source bridge='{bridge}'/>
      <mac address='52:54:00:77:06:02'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='{guest / "console.log"}'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
""")
    xml.chmod(0o644)
    return xml


def ping_guest(ns: str) -> bool:
    """One echo from the bridge to the guest (busybox: the e2e suite has it)."""
    run = subprocess.run(
        ["ip", "netns", "exec", ns, "busybox", "ping", "-c", "1", "-W", "2", GUEST_ADDR],
        capture_output=True,
        text=True,
    )
    return run.returncode == 0


@pytest.fixture
def session(ns: str, br0: str, user_venv: Path, tmp_path: Path) -> Iterator[tuple[Session, Daemon]]:
    entry = ensure_user()
    ip("-n", ns, "addr", "add", f"{BRIDGE_ADDR}/24", "dev", "br0")
    ip("-n", ns, "link", "add", "br1", "type", "bridge")
    config = f"""
[[allow]]
users = ["{entry.pw_name}"]
bridges = ["br0"]
"""
    # The mount point the private namespace binds over: an empty directory
    # on the host, made only if the host has none (tapd's install makes it).
    made_etc = not os.path.isdir("/etc/tapd")
    if made_etc:
        os.mkdir("/etc/tapd", 0o755)
    root = private_dir("tapd-e2e-libvirt-")
    try:
        with run_daemon(ns, tmp_path, config) as daemon:
            os.chmod(os.path.dirname(daemon.socket_path), 0o755)
            os.chmod(daemon.socket_path, 0o666)
            (root / "etc/tapd").mkdir(parents=True)
            (root / "etc/tapd/client.conf").write_text(f"socket = {daemon.socket_path}\n")
            xdg = root / "xdg"
            for sub in ("config/libvirt", "cache", "data", "run"):
                (xdg / sub).mkdir(parents=True)
            (xdg / "config/libvirt/qemu.conf").write_text(
                f'bridge_helper = "{user_venv / "bin/tapd-bridge-helper"}"\n'
            )
            (root / "guest").mkdir()
            for path in [xdg, *xdg.rglob("*"), root / "guest"]:
                os.chown(path, entry.pw_uid, entry.pw_gid)
            (xdg / "run").chmod(0o700)
            env = {
                "XDG_CONFIG_HOME": str(xdg / "config"),
                "XDG_CACHE_HOME": str(xdg / "cache"),
                "XDG_DATA_HOME": str(xdg / "data"),
                "XDG_RUNTIME_DIR": str(xdg / "run"),
            }
            session = Session(ns=ns, root=root, env=env)
            try:
                yield session, daemon
            finally:
                session.virsh("destroy", DOMAIN, check=False)
                # the session daemons, virtlogd and any QEMU: the user is the suite's own
                subprocess.run(["pkill", "-KILL", "-u", entry.pw_name], check=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if made_etc:
            os.rmdir("/etc/tapd")


def test_a_session_domain_gets_its_tap_from_tapd_and_keeps_it_across_libvirtd_restarts(
    session: tuple[Session, Daemon], guest_image: GuestImage
) -> None:
    lv, daemon = session
    lv.virsh("create", str(domain_xml(lv, guest_image, "br0")))
    wait_until(
        lambda: parse_guest_output(lv.console()).get("ping") == "ok",
        timeout=90,
        what="the guest to ping the bridge",
    )
    (lease,) = daemon.leases()
    assert lease["uid"] == ensure_user().pw_uid and lease["bridge"] == "br0"
    # libvirt, not QEMU, ran the helper: its session daemon owns the lease.
    libvirtd = lease["pid"]
    assert libvirtd in lv.daemon_pids()
    assert taps(daemon.ns) == [lease["ifname"]]

    # The session daemon goes (idle exit, upgrade, crash) under a paused VM.
    lv.virsh("suspend", DOMAIN)
    os.kill(libvirtd, signal.SIGKILL)
    wait_until(lambda: libvirtd not in lv.daemon_pids(), what="the session daemon to exit")
    time.sleep(1)  # tapd has seen the owner's exit by now
    assert taps(daemon.ns) == [lease["ifname"]], "tapd removed a tap QEMU still holds"
    assert [x["ifname"] for x in daemon.leases()] == [lease["ifname"]]

    lv.virsh("resume", DOMAIN)  # a new session daemon, reconnecting to QEMU
    wait_until(lambda: ping_guest(daemon.ns), timeout=30, what="the resumed guest to answer")

    lv.virsh("destroy", DOMAIN)
    wait_until(lambda: taps(daemon.ns) == [], what="the tap to go with the domain")
    wait_until(lambda: daemon.leases() == [], what="the lease to end")


def test_a_refused_bridge_shows_tapds_message_in_virshs_error(
    session: tuple[Session, Daemon], guest_image: GuestImage
) -> None:
    lv, daemon = session
    run = lv.virsh("create", str(domain_xml(lv, guest_image, "br1")), check=False)
    assert run.returncode != 0
    assert "not allowed to use bridge 'br1'" in run.stderr, run.stderr
    assert taps(daemon.ns) == []
    assert daemon.leases() == []
