"""Owner processes named robustly against pid reuse."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tapd import owner


def test_start_time_and_parent_of_this_process() -> None:
    pidfd = os.pidfd_open(os.getpid())
    try:
        start = owner.identify(pidfd, os.getpid())
        assert start is not None and start == owner.starttime(os.getpid())
        found = owner.parent(pidfd, os.getpid())
        assert found is not None
        ppid, ppidfd = found
        os.close(ppidfd)
        assert ppid == os.getppid()
    finally:
        os.close(pidfd)


def _started_at(ticks: int) -> float:
    """A start time in clock ticks since boot (proc(5)), as a Unix time:
    from the boot time in /proc/stat's ``btime`` line."""
    with open("/proc/stat") as stat:
        btime = next(int(line.split()[1]) for line in stat if line.startswith("btime "))
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def test_a_process_with_spaces_and_parens_in_its_name() -> None:
    # /proc/PID/stat's second field is the command in parentheses, and may
    # itself hold ') ('; the fields after it must still be found.
    child = (
        "import sys\n"
        "open('/proc/self/comm', 'w').write('a) (b c')\n"
        "print(flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        with open(f"/proc/{proc.pid}/stat", "rb") as stat:
            assert b"(a) (b c)" in stat.read()
        start = owner.starttime(proc.pid)
        assert start is not None
        # Checked against other sources than /proc/PID/stat (reopen below
        # reads the same field, so it would agree with a wrong one): the
        # child started a moment ago, as the boot time says, and it is ours.
        assert abs(_started_at(start) - time.time()) < 30
        pidfd = owner.reopen(proc.pid, start)
        assert pidfd is not None
        try:
            found = owner.parent(pidfd, proc.pid)
            assert found is not None
            ppid, ppidfd = found
            os.close(ppidfd)
            assert ppid == os.getpid()
        finally:
            os.close(pidfd)
    finally:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        proc.wait()
        proc.stdout.close()


def test_a_dead_owner_cannot_be_reopened_even_by_a_reused_pid() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    pid = proc.pid
    pidfd = os.pidfd_open(pid)
    start = owner.identify(pidfd, pid)
    assert start is not None
    proc.wait()
    deadline = time.monotonic() + 5
    while not owner.exited(pidfd):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.close(pidfd)
    assert owner.reopen(pid, start) is None
    # a live process whose start time does not match is not the owner
    assert owner.reopen(os.getpid(), start) is None


def test_an_owner_gone_before_its_tap_is_a_race_not_a_denial() -> None:
    from tapd.errors import OwnerGone, to_wire

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    pidfd = os.pidfd_open(child.pid)
    child.wait()  # exited and reaped: its pid names nothing now
    try:
        owner.Owner(child.pid, pidfd)
    except OwnerGone as exc:
        assert to_wire(exc)["error"]["code"] == "owner-gone"
    else:
        raise AssertionError("an exited process became a lease's owner")
    # A peer whose pidfd could not be taken (it was gone at accept).
    gone = owner.Peer(uid=os.getuid(), gid=os.getgid(), pid=child.pid, pidfd=-1)
    for find in (owner.Owner.of_peer, owner.Owner.parent_of):
        try:
            find(gone)
        except OwnerGone:
            continue
        raise AssertionError(f"{find.__name__} took a process that is gone")
