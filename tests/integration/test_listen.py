"""Every way tapd gets its listening socket, and a clean stop."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tapdtest import daemon_argv, taps, wait_until

from tapd import client


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tapd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _start(ns: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *daemon_argv(*args)],
            stderr=out,
            stdin=subprocess.DEVNULL,
        )


def _hello_when_up(path: str, proc: subprocess.Popen[bytes], log: Path) -> dict[str, object]:
    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        return os.path.exists(path)

    wait_until(up, timeout=15, what=f"{path} to appear")
    return client.hello(path=path)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=10)


def test_socket_path_mode_and_clean_stop(ns: str, br0: str, sockdir: Path) -> None:
    path = str(sockdir / "tapd.sock")
    log = sockdir / "log"
    cfg = sockdir / "tapd.toml"
    cfg.write_text('[server]\nsocket_mode = "0600"\nsocket_group = "0"\n')
    proc = _start(ns, "--config", str(cfg), "--socket", path, log=log)
    try:
        assert _hello_when_up(path, proc, log)["ok"] is True
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == 0
        # The private directory it was made in is gone.
        assert sorted(os.listdir(sockdir)) == ["log", "tapd.sock", "tapd.toml"]
        grant = client.request_tap(path=path, br=br0)
    finally:
        assert _stop(proc) == 0
    # SIGTERM: the socket file goes, a VM's tap stays as long as the VM holds it.
    assert not os.path.exists(path)
    assert taps(ns) == [grant.ifname]
    grant.close()
    wait_until(lambda: taps(ns) == [], what="tap to vanish")


def test_a_stale_socket_is_replaced(ns: str, sockdir: Path) -> None:
    path = str(sockdir / "tapd.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays; nobody listens: a crashed daemon's leftover
    log = sockdir / "log"
    proc = _start(ns, "--socket", path, log=log)
    try:
        wait_until(lambda: b"server.listening" in log.read_bytes(), timeout=15, what="listening")
        assert client.hello(path=path)["ok"] is True
    finally:
        _stop(proc)


def test_a_live_socket_or_a_plain_file_is_never_replaced(ns: str, sockdir: Path) -> None:
    live = str(sockdir / "live.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(live)
    listener.listen(1)
    plain = sockdir / "plain"
    plain.write_text("precious")
    try:
        for path, says in ((live, "already serving"), (str(plain), "not a socket")):
            result = subprocess.run(
                ["ip", "netns", "exec", ns, *daemon_argv("--socket", path)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert result.returncode == 2
            assert says in result.stderr
        assert plain.read_text() == "precious"
        assert os.path.exists(live)
    finally:
        listener.close()


NOBODY = 65534


def _refused(ns: str, path: str, needle: str) -> None:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, *daemon_argv("--socket", path)],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"tapd listened on {path}") from None
    assert proc.returncode == 2, err
    assert needle in err and "only root can write" in err, err


@pytest.mark.parametrize(
    ("mode", "uid", "says"),
    [
        (0o1777, 0, "writable by its group or by everyone (mode 1777)"),  # /tmp itself
        (0o775, 0, "writable by its group"),
        (0o755, NOBODY, f"belongs to uid {NOBODY}"),
    ],
)
def test_a_socket_directory_others_can_write_is_refused(
    ns: str, sockdir: Path, mode: int, uid: int, says: str
) -> None:
    shared = sockdir / "shared"
    shared.mkdir()
    os.chown(shared, uid, -1)
    shared.chmod(mode)
    _refused(ns, str(shared / "tapd.sock"), says)
    assert os.listdir(shared) == []


def test_a_directory_under_a_sticky_one_is_fine(ns: str, sockdir: Path) -> None:
    # /tmp/DIR: others may add to /tmp, not rename root's DIR.
    sockdir.chmod(0o1777)
    (sockdir / "own").mkdir(mode=0o755)
    path = str(sockdir / "own" / "tapd.sock")
    log = sockdir / "log"
    proc = _start(ns, "--socket", path, log=log)
    try:
        assert _hello_when_up(path, proc, log)["ok"] is True
    finally:
        assert _stop(proc) == 0


#: as uid NOBODY, in its own directory: swap every file tapd makes for a
#: symlink to argv[2], so that tapd's chmod and rename would follow it
_SWAPPER = r"""
import os, sys, time
os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
where, victim, swapped = sys.argv[1], sys.argv[2], 0
deadline = time.monotonic() + 20
print("ready", flush=True)
while time.monotonic() < deadline:
    for name in os.listdir(where):
        path = os.path.join(where, name)
        if name.startswith("away") or os.path.islink(path):
            continue
        try:
            os.rename(path, os.path.join(where, f"away{swapped}"))
            os.symlink(victim, path)
            swapped += 1
        except OSError:
            pass
"""


def test_a_symlink_swapped_in_by_another_uid_cannot_redirect_the_chmod(
    ns: str, sockdir: Path
) -> None:
    victim = sockdir / "victim"
    victim.write_text("root's")
    victim.chmod(0o600)
    sockdir.chmod(0o755)
    theirs = sockdir / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    swapper = subprocess.Popen(
        [sys.executable, "-c", _SWAPPER, str(theirs), str(victim)],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert swapper.stdout is not None and swapper.stdout.readline() == "ready\n"
        _refused(ns, str(theirs / "tapd.sock"), f"belongs to uid {NOBODY}")
    finally:
        swapper.kill()
        swapper.wait()
        if swapper.stdout is not None:
            swapper.stdout.close()
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert not any(stat.S_ISSOCK(p.lstat().st_mode) for p in theirs.iterdir())


def test_listen_fd_refuses_what_is_not_a_listening_unix_socket(ns: str) -> None:
    r, w = os.pipe()
    try:
        result = subprocess.run(
            ["ip", "netns", "exec", ns, *daemon_argv("--listen-fd", str(r))],
            pass_fds=[r],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        os.close(r)
        os.close(w)
    assert result.returncode == 2
    assert "not a socket" in result.stderr


def test_systemd_socket_activation_serves_the_first_request(
    ns: str, br0: str, sockdir: Path
) -> None:
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate is installed by .ci/run"
    path = str(sockdir / "tapd.sock")
    log = sockdir / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, activate, "-l", path, *daemon_argv()],
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    try:
        # The socket exists before tapd does: connecting at once must work.
        wait_until(lambda: os.path.exists(path), timeout=10, what="the activation socket")
        grant = client.request_tap(path=path, br=br0)
        assert grant.ifname in taps(ns)
        grant.close()
        wait_until(lambda: b'"source": "systemd"' in log.read_bytes(), what="log line")
    finally:
        _stop(proc)
