"""Running tapd's clients and VMMs as an unprivileged user, as people do.

The interpreter the test suite runs on may live where other users cannot
read it (a pyenv under /root), so the user gets what a host would give it: a
virtualenv made from Debian's ``/usr/bin/python3`` in a directory it can read,
with tapd installed from a wheel of this checkout (no dependencies: the
clients need only the standard library).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: a system user of the test suite's own (made on first use)
USER = "tapd-e2e"
HOME = Path("/var/lib/tapd-e2e")
SYSTEM_PYTHON = "/usr/bin/python3"


def ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--create-home", "--home-dir", str(HOME),
             "--shell", "/usr/sbin/nologin", USER],
            check=True,
        )  # fmt: skip
        return pwd.getpwnam(USER)


def build_user_venv(where: Path) -> Path:
    """A virtualenv under ``where`` (made readable by everyone) from the
    system's Python, with tapd installed without its daemon dependencies."""
    wheels = where / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
        check=True,
        cwd=where,
    )
    venv = where / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    (wheel,) = wheels.glob("tapd-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "-q",
         "--no-deps", "--no-index", str(wheel)],
        check=True,
    )  # fmt: skip
    for path in [where, *where.rglob("*")]:
        if path.is_dir() or os.access(path, os.X_OK):
            path.chmod(path.stat().st_mode | 0o555)
        else:
            path.chmod(path.stat().st_mode | 0o444)
    return venv


def as_user(*argv: str, env: dict[str, str] | None = None) -> list[str]:
    """argv running ``argv`` as the test user with the clean environment a
    login would give it (and nothing of root's)."""
    entry = ensure_user()
    clean = {
        "HOME": entry.pw_dir,
        "USER": USER,
        "LOGNAME": USER,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "XDG_RUNTIME_DIR": f"{entry.pw_dir}/run",
        **(env or {}),
    }
    return [
        "setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups",
        "env", "-i", *(f"{k}={v}" for k, v in clean.items()), *argv,
    ]  # fmt: skip


#: a shell prelude for a private mount namespace in which /dev/net/tun is
#: 0666, as Debian's udev rule makes it; some hosts (this CI's containers)
#: leave it 0600, and a VMM that opens its tap by name must open the device.
_OPEN_TUN = (
    'if [ "$(stat -c %a /dev/net/tun)" != 666 ]; then '
    'd=$(mktemp -d) && mount -t tmpfs tapd-tun "$d" && mknod -m 666 "$d/tun" c 10 200 '
    '&& mount --bind "$d/tun" /dev/net/tun; fi && exec "$@"'
)


def with_open_tun(*argv: str) -> list[str]:
    """argv running ``argv`` where /dev/net/tun may be opened by anyone,
    without changing the host's own device node."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _OPEN_TUN, "sh", *argv]


def readable_copy(paths: list[Path], where: Path) -> list[Path]:
    """Copies of ``paths`` (a guest kernel and initrd) the test user can read."""
    out = []
    for path in paths:
        dest = where / path.name
        shutil.copyfile(path, dest)
        dest.chmod(0o644)
        out.append(dest)
    return out


def private_dir(prefix: str) -> Path:
    """A fresh directory everyone may enter and read (not write)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path
