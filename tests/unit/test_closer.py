"""The closers' bookkeeping, without root: what a stuck closer leaves, when one
is deemed stuck, and what happens to the fds it had not begun.

The processes are stand-ins (``sleep``) and the shared counters are written
by the test, so every path - progress, a stuck close, a closer that does not
die, the bound on stuck closers - runs without FUSE or clone()."""

from __future__ import annotations

import mmap
import os
import subprocess
from collections.abc import Iterator

import pytest
import trio

from tapd import closer, config, tun
from tapd.closer import Closers, _Closer, settle


def test_settle_splits_at_the_fd_it_began() -> None:
    sent = [(10, "a"), (11, "a"), (12, "b"), (13, "c")]
    # finished 10 (base 5 means fd number 5 in its order), began 11: stuck on 11
    at = settle(sent, base=5, begun=7)
    assert at.stuck == (11, "a") and at.retake == [(12, "b"), (13, "c")]


def test_settle_with_nothing_begun_retakes_everything() -> None:
    sent = [(10, "a"), (11, "b")]
    at = settle(sent, base=3, begun=3)
    assert at.stuck is None and at.retake == sent


def test_settle_never_reaches_past_what_was_sent() -> None:
    at = settle([(10, "a")], base=0, begun=9)
    assert at.stuck == (10, "a") and at.retake == []


class Rig:
    """Closers with a stand-in spawner and closer: pipes and ``sleep``s."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.fds: list[int] = []
        spawner = self.sleeper()
        requests_r, requests_w = self.pipe()
        replies_r, replies_w = self.pipe()
        self.shared = mmap.mmap(-1, 4096)
        self.closers = Closers(
            spawner.pid, os.pidfd_open(spawner.pid), requests_w, replies_r, self.shared
        )
        self.closers.timeout = 1.0
        self.fds += [self.closers._spawner_pidfd]
        self.requests_r, self.replies_w = requests_r, replies_w

    def sleeper(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "60"])
        self.procs.append(proc)
        return proc

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.fds += [r, w]
        return r, w

    def closer(self, slot: int = 0) -> _Closer:
        proc = self.sleeper()
        commands_r, commands_w = os.pipe()  # closed by the code under test
        os.set_blocking(commands_w, False)
        made = _Closer(proc.pid, os.pidfd_open(proc.pid), commands_r, commands_w, slot)
        self.closers._free_slots.remove(slot)
        return made

    def counters(self, slot: int, begun: int, finished: int) -> None:
        self.closers._counters[2 * slot] = begun
        self.closers._counters[2 * slot + 1] = finished

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        tun.close_all(self.fds)


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = Rig()
    yield made
    made.close()


def fresh_fds(n: int) -> list[int]:
    """fds that stand for what clients sent (the code closes none itself)."""
    out = []
    for _ in range(n):
        out.append(os.open("/dev/null", os.O_RDONLY))
    return out


def test_given_fds_are_written_to_the_closer_in_order(rig: Rig) -> None:
    current = rig.closers.current = rig.closer()
    fds = fresh_fds(3)
    try:
        rig.closers.give(fds, "uid=1 pid=2 conn=3")
        written = os.read(current.commands_r, 4096)
        assert list(memoryview(written).cast("i")) == fds
        assert [w for _, w in current.sent] == ["uid=1 pid=2 conn=3"] * 3
        assert not rig.closers.waiting
    finally:
        for fd in fds:
            os.close(fd)


def test_without_a_healthy_closer_fds_wait(rig: Rig) -> None:
    assert not rig.closers.healthy
    rig.closers.give([101, 102], "x")
    assert list(rig.closers.waiting) == [(101, "x"), (102, "x")]


def test_progress_is_not_stuck_and_a_silent_closer_is(rig: Rig) -> None:
    current = rig.closers.current = rig.closer()
    rig.closers.give([5, 6, 7], "x")  # numbers only: the stand-in closes nothing
    start = current.progress_at
    assert rig.closers.check(start + 0.5) is None
    rig.counters(0, begun=2, finished=1)
    assert rig.closers.check(start + 0.9) is None  # one finished: progress
    assert list(current.sent) == [(6, "x"), (7, "x")] and current.base == 1
    assert rig.closers.check(start + 1.5) is None  # 0.6 s since that progress
    assert rig.closers.check(start + 2.0) is current


def test_an_idle_closer_given_work_is_timed_from_then(rig: Rig) -> None:
    current = rig.closers.current = rig.closer()
    current.progress_at -= 100  # idle for long
    rig.closers.give([5], "x")
    assert rig.closers.check(current.progress_at + 0.5) is None


async def test_a_stuck_closer_is_killed_and_its_unbegun_fds_retaken(rig: Rig) -> None:
    current = rig.closers.current = rig.closer()
    rig.closers.give([5, 6, 7, 8], "x")
    rig.closers.give([9], "victim")
    rig.counters(0, begun=2, finished=1)  # finished 5, stuck in 6
    rig.closers.check(current.progress_at)
    await rig.closers._abandon(current)
    assert rig.closers.current is None
    assert list(rig.closers.waiting) == [(7, "x"), (8, "x"), (9, "victim")]
    # The stand-in died of SIGKILL, so it is not counted as stuck.
    assert rig.procs[-1].wait() == -9
    assert rig.closers.stuck == []
    assert 0 in rig.closers._free_slots


async def test_closers_that_do_not_die_count_until_the_bound(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A closer in a FUSE flush outlives SIGKILL: pretend no pidfd ever polls.
    monkeypatch.setattr(closer, "_exited", lambda pidfd: False)
    monkeypatch.setattr(closer.signal, "pidfd_send_signal", lambda pidfd, sig: None)
    rig.closers.max_stuck = 2
    for slot in (0, 1):
        current = rig.closers.current = rig.closer(slot)
        rig.closers.give([40 + slot], f"attacker {slot}")
        rig.counters(slot, begun=1, finished=0)
        with trio.move_on_after(5):
            await rig.closers._abandon(current)
    assert [whose for _, whose in rig.closers.stuck] == ["attacker 0", "attacker 1"]
    # At the bound no closer is asked for: fds wait, and the server refuses them.
    await rig.closers._replace()
    assert not rig.closers.healthy
    os.set_blocking(rig.requests_r, False)
    with pytest.raises(BlockingIOError):
        os.read(rig.requests_r, 4)  # the spawner was asked for nothing


def test_closer_config_keys_reach_the_closers(rig: Rig) -> None:
    server = config.parse("[server]\ncloser_timeout = 0.5\nmax_stuck_closers = 3\n").server
    rig.closers.configure(server)
    assert (rig.closers.timeout, rig.closers.max_stuck) == (0.5, 3)


async def test_a_spawner_that_cannot_be_asked_leaves_tapd_running(rig: Rig) -> None:
    os.close(rig.requests_r)  # nobody reads the requests any more: EPIPE
    rig.fds.remove(rig.requests_r)
    slots = len(rig.closers._free_slots)
    await rig.closers._replace()
    assert not rig.closers.healthy and len(rig.closers._free_slots) == slots
    rig.procs[0].kill()  # the spawner is gone: not asked again
    rig.procs[0].wait()
    await rig.closers._replace()
    assert rig.closers._spawner_gone
