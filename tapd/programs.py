"""Running the programs an administrator listed: bridge helpers and scripts.

Every subprocess tapd starts goes through :func:`_run`, which gives it a clean
environment, no stdin, only the fds named, and a time limit.  Clients name a
program; they never supply a path, an argument that becomes a shell word, or
an environment variable.
"""

from __future__ import annotations

import json
import socket
import subprocess
from typing import Any

import trio

from . import fdpass
from .errors import HelperFailed, HookFailed, KernelError
from .tun import close_all

#: the whole environment a helper or script sees
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


async def _run(
    argv: list[str], timeout: float, pass_fds: tuple[int, ...] = (), stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes] | None:
    """Run ``argv`` to completion; None if it ran out of time (it is killed)."""
    with trio.move_on_after(timeout):
        return await trio.run_process(
            argv,
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=CLEAN_ENV,
            pass_fds=pass_fds,
            cwd="/",
        )
    return None


def _tail(data: bytes) -> str:
    text = data.decode(errors="replace").strip()
    return text[-400:]


async def run_hook(name: str, path: str, ifname: str, timeout: float) -> str:
    """Run a network script as QEMU's launch_script() does: ``path ifname``.
    Returns what it printed; raises :class:`HookFailed` unless it exits 0."""
    result = await _run([path, ifname], timeout)
    if result is None:
        raise HookFailed(f"network script {name} did not finish within {timeout:g} s")
    if result.returncode != 0:
        said = _tail(result.stderr or result.stdout)
        raise HookFailed(
            f"network script {name} failed with status {result.returncode}"
            + (f": {said}" if said else "")
        )
    return _tail(result.stdout)


async def run_helper(name: str, path: str, bridge: str, timeout: float) -> int:
    """Run a bridge helper with QEMU's protocol (net_bridge_run_helper()):
    ``path --use-vnet --fd=N --br=BRIDGE``; it sends one byte with the tap fd
    in SCM_RIGHTS on fd N and exits 0.  Returns the fd (the caller owns it)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds: list[int] = []
    try:
        with theirs:
            argv = [path, "--use-vnet", f"--fd={theirs.fileno()}", f"--br={bridge}"]
            result = await _run(argv, timeout, pass_fds=(theirs.fileno(),))
        if result is None:
            raise HelperFailed(f"bridge helper {name} did not finish within {timeout:g} s")
        # The helper has exited: what it sent is waiting in the socket.
        ours.setblocking(False)
        try:
            got = fdpass.recv_sync(ours, 1)
            fds = got.fds
        except BlockingIOError:
            pass
        if result.returncode != 0:
            said = _tail(result.stderr)
            raise HelperFailed(
                f"bridge helper {name} failed with status {result.returncode}"
                + (f": {said}" if said else "")
            )
        if len(fds) != 1:
            raise HelperFailed(
                f"bridge helper {name} exited 0 but sent {len(fds)} fds instead of one"
            )
        fd = fds.pop()
        return fd
    finally:
        close_all(fds)
        ours.close()


async def run_nft(path: str, document: dict[str, Any], timeout: float = 10.0) -> bytes:
    """Hand nft(8) one JSON document (``nft -j -f -``: a single transaction)
    and return what it printed; :class:`KernelError` with nft's words if it
    refused."""
    result = await _run([path, "-j", "-f", "-"], timeout, stdin=json.dumps(document).encode())
    if result is None:
        raise KernelError(f"nft did not finish within {timeout:g} s")
    if result.returncode != 0:
        raise KernelError(f"nft refused tapd's rules: {_tail(result.stderr)}")
    return result.stdout


async def list_nft_table(path: str, family: str, table: str, timeout: float = 10.0) -> Any:
    """``nft -j list table FAMILY TABLE`` as JSON; None if there is no such table."""
    result = await _run([path, "-j", "list", "table", family, table], timeout)
    if result is None or result.returncode != 0:
        return None
    return json.loads(result.stdout)
