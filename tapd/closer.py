"""Closing what clients sent, where a close that never returns stops nothing.

``close()`` of any fd calls the file's ``->flush`` (fs/open.c: ``filp_close``
-> ``filp_flush``), not only the last close, and FUSE's flush is a forced
request that waits uninterruptibly for a server a user may write
(fs/fuse/file.c: ``fuse_flush``).  The final ``fput`` of a socket runs its
release where the last reference dropped: a TCP socket with ``SO_LINGER`` and
a full send queue waits there for the linger time (net/ipv4/tcp.c:
``tcp_close`` -> ``sk_stream_wait_close``), and a UNIX socket releases the
files still queued on it.  So tapd never closes an fd a client sent, nor a
client's connection, on its own threads.

It hands their numbers to a *closer*: a small process that shares tapd's fd
table (``clone(CLONE_FILES)``), so that its ``close()`` takes the fd out of
the one table at once while any wait happens in the closer.  A process that
merely received a copy could not help: tapd's own close would still flush.
The closer counts in shared memory the fds it has begun and finished closing;
one that stops finishing is *stuck*: tapd logs whose fd it was, sends it
SIGKILL (which ends a TCP linger at once; a FUSE flush keeps it until the
server answers or dies, and it then never runs another instruction of its
own), takes back the fds it had not begun, and asks for a fresh closer.

Closers come from a *spawner*, made with the same raw ``clone()`` when tapd
starts, before any thread exists: cloning the multi-threaded daemon would copy
one thread and every lock the others held.  Both die with their parent
(``PR_SET_PDEATHSIG``).  While no closer is healthy - one is being made, or
:attr:`Closers.max_stuck` are stuck - :attr:`Closers.healthy` is false and the
server refuses messages that carry fds.

Nothing here may run tapd's Python destructors in a child: a child frees no
object it did not make (the cyclic GC is off there), opens nothing but what
its parent asked for, and leaves only through ``os._exit``.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import gc
import mmap
import os
import platform
import select
import signal
import socket
import struct
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import log as logging
from .config import ServerConfig

# <linux/sched.h>
CLONE_FILES = 0x0000_0400
CLONE_PIDFD = 0x0000_1000
# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
#: <asm/unistd_64.h> (x86_64), <asm-generic/unistd.h> (arm64): __NR_clone
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}

#: fds per write to a closer: 1024 ints fill PIPE_BUF (4096), which the
#: kernel writes to a pipe at once or not at all (pipe(7)).
_BATCH = 1024
_INT = array.array("i").itemsize
#: closers the shared counters have room for (two 8-byte counters each)
_SLOTS = 256

_libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the GIL stays held through clone()
_libc.syscall.restype = ctypes.c_long


class CloserError(Exception):
    """No closer could be made."""


def _clone(flags: int) -> tuple[int, int]:
    """Raw ``clone(flags | CLONE_PIDFD)`` with no new stack: the child goes on
    from here on a copy of the caller's memory, as after fork().  Returns
    (pid, pidfd) in the parent, (0, -1) in the child."""
    number = _SYS_CLONE.get(platform.machine())
    if number is None:
        raise CloserError(f"no clone() syscall number known for {platform.machine()}")
    pidfd = ctypes.c_int(-1)
    # clone(flags, newsp, parent_tid, ...): with CLONE_PIDFD the kernel puts the
    # pidfd at parent_tid (kernel/fork.c); the last two arguments, whose order
    # differs between architectures, are unused here.
    pid = _libc.syscall(
        ctypes.c_long(number),
        ctypes.c_long(flags | CLONE_PIDFD | signal.SIGCHLD),
        ctypes.c_long(0),
        ctypes.byref(pidfd),
        ctypes.c_long(0),
        ctypes.c_long(0),
    )
    if pid < 0:
        err = ctypes.get_errno()
        raise CloserError(f"clone() failed: {os.strerror(err)}")
    return pid, (pidfd.value if pid else -1)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _become_child(parent: int) -> None:
    """The first steps of a cloned child: die with ``parent``, ignore the
    signals meant for tapd (a terminal's ^C reaches the whole group)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)
    if _libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL), 0, 0, 0):
        os._exit(70)
    # The parent may have died before prctl(): then nobody will kill us.
    if os.getppid() != parent:
        os._exit(0)


def _run_child(parent: int, body: Any, *args: Any) -> None:
    """Run ``body`` in a cloned child and leave only through os._exit."""
    status = 70
    try:
        _become_child(parent)
        body(*args)
        status = 0
    except BaseException:
        status = 70
    finally:
        os._exit(status)


def _closer_loop(commands: int, counters: memoryview, slot: int) -> None:
    """Close every fd number written to ``commands`` until it reaches EOF.

    ``counters[2*slot]`` counts the fds begun, ``counters[2*slot + 1]`` those
    finished: tapd reads them to tell progress from a stuck close.
    """
    begun, finished = 2 * slot, 2 * slot + 1
    while True:
        data = os.read(commands, _BATCH * _INT)
        if not data:
            return
        for fd in array.array("i", data):
            counters[begun] += 1
            with contextlib.suppress(OSError):
                os.close(fd)
            counters[finished] += 1


_REPLY = struct.Struct("iiii")  # pid (or -errno), pidfd, command pipe read end, write end


def _spawner_loop(requests: int, replies: int, counters: memoryview) -> None:
    """Make a closer for each slot number tapd writes to ``requests``."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # closers reap themselves
    me = os.getpid()
    while True:
        data = os.read(requests, 4)
        if len(data) < 4:
            return
        (slot,) = struct.unpack("i", data)
        try:
            commands_r, commands_w = os.pipe()
        except OSError as exc:
            os.write(replies, _REPLY.pack(-(exc.errno or errno.EIO), -1, -1, -1))
            continue
        try:
            pid, pidfd = _clone(CLONE_FILES)
        except CloserError:
            os.close(commands_r)
            os.close(commands_w)
            os.write(replies, _REPLY.pack(-errno.EAGAIN, -1, -1, -1))
            continue
        if pid == 0:
            _run_child(me, _closer_loop, commands_r, counters, slot)
        os.write(replies, _REPLY.pack(pid, pidfd, commands_r, commands_w))


@dataclass
class _Closer:
    """tapd's view of one closer: what it was sent, oldest first, and since
    when it has made no progress on it."""

    pid: int
    pidfd: int
    commands_r: int
    commands_w: int
    slot: int
    #: (fd, whose) written to it and not known finished; sent[0] is fd number
    #: ``base`` in the order the closer takes them
    sent: deque[tuple[int, str]] = field(default_factory=deque)
    base: int = 0
    #: when it last finished an fd, or was given work while idle
    progress_at: float = 0.0


@dataclass(frozen=True)
class StuckAt:
    """What a stuck closer leaves: the fd it is stuck on (if it had begun
    one: its state is unknown, so nobody touches it again) and the fds it had
    not begun, for another closer."""

    stuck: tuple[int, str] | None
    retake: list[tuple[int, str]]


def settle(sent: Iterable[tuple[int, str]], base: int, begun: int) -> StuckAt:
    """Split a stopped closer's unfinished work by its ``begun`` counter.

    ``sent`` holds fd numbers ``base``, ``base + 1``, ... in the order given;
    the closer finished every one below ``base``.  Fd number ``begun - 1``,
    if not finished, was begun: it is the one it is stuck on.
    """
    items = list(sent)
    started = max(0, min(begun - base, len(items)))
    if started == 0:
        return StuckAt(None, items)
    return StuckAt(items[started - 1], items[started:])


class Closers:
    """The closers of one tapd, its spawner, and the fds waiting for them."""

    def __init__(
        self,
        spawner_pid: int,
        spawner_pidfd: int,
        requests_w: int,
        replies_r: int,
        shared: mmap.mmap,
    ) -> None:
        self.log = logging.get()
        self.spawner_pid = spawner_pid
        self._spawner_pidfd = spawner_pidfd
        self._requests_w = requests_w
        self._replies_r = replies_r
        self._shared = shared
        self._counters = memoryview(shared).cast("q")
        self._free_slots = list(range(_SLOTS - 1, -1, -1))
        #: the closer fds go to, or None while there is no healthy one
        self.current: _Closer | None = None
        #: closers killed while stuck that have not exited yet, with whose fd
        self.stuck: list[tuple[_Closer, str]] = []
        #: fds waiting for a closer, oldest first
        self.waiting: deque[tuple[int, str]] = deque()
        #: seconds a closer may make no progress on fds it was given
        self.timeout = 2.0
        #: closers that may be stuck at once before tapd stops taking fds
        self.max_stuck = 8
        self._wake = trio.Event()
        self._spawning = False
        self._spawner_gone = False

    def configure(self, server: ServerConfig) -> None:
        self.timeout = server.closer_timeout
        self.max_stuck = server.max_stuck_closers
        self._wake.set()

    # -- made before any thread exists -------------------------------------------

    @classmethod
    def start(cls) -> Closers:
        """Make the spawner and a first closer.  Call while tapd has a single
        thread (before trio and the kernel worker)."""
        if _threads() != 1:
            raise CloserError("the closers must be made before tapd starts any thread")
        shared = mmap.mmap(-1, _SLOTS * 2 * 8)  # MAP_SHARED | MAP_ANONYMOUS
        counters = memoryview(shared).cast("q")
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        parent = os.getpid()
        # No cyclic GC may run in the child: it could finalize an object that
        # owns one of tapd's fds, and close it in the table they share.
        gc_was = gc.isenabled()
        gc.disable()
        try:
            pid, pidfd = _clone(CLONE_FILES)
            if pid == 0:
                _run_child(parent, _spawner_loop, requests_r, replies_w, counters)
        finally:
            if gc_was:
                gc.enable()
        # requests_r and replies_w are the spawner's: in the table both share,
        # tapd leaves them alone.
        closers = cls(pid, pidfd, requests_w, replies_r, shared)
        closers.current = closers._make_sync()
        return closers

    def _request(self) -> int:
        slot = self._free_slots.pop()
        self._counters[2 * slot] = 0
        self._counters[2 * slot + 1] = 0
        try:
            os.write(self._requests_w, struct.pack("i", slot))
        except BaseException:
            self._free_slots.append(slot)
            raise
        return slot

    def _answer(self, slot: int, raw: bytes) -> _Closer:
        pid, pidfd, commands_r, commands_w = _REPLY.unpack(raw)
        if pid < 0:
            self._free_slots.append(slot)
            raise CloserError(f"the spawner could not make a closer: {os.strerror(-pid)}")
        os.set_blocking(commands_w, False)
        return _Closer(pid, pidfd, commands_r, commands_w, slot, progress_at=time.monotonic())

    def _make_sync(self) -> _Closer:
        slot = self._request()
        # Its reply, or its end: the reply pipe's write end stays open in the
        # table it shared, so a dead spawner brings no EOF.
        poller = select.poll()
        poller.register(self._replies_r, select.POLLIN)
        poller.register(self._spawner_pidfd, select.POLLIN)
        poller.poll()
        if _exited(self._spawner_pidfd):
            raise CloserError("the spawner exited before making a closer")
        return self._answer(slot, _read_exactly(self._replies_r, _REPLY.size))

    async def _make(self) -> _Closer:
        try:
            slot = self._request()
        except OSError as exc:  # EPIPE: the spawner is gone
            raise CloserError(f"cannot ask the spawner: {exc.strerror or exc}") from None
        os.set_blocking(self._replies_r, False)
        buf = b""
        while len(buf) < _REPLY.size:
            try:
                got = os.read(self._replies_r, _REPLY.size - len(buf))
            except BlockingIOError:
                with trio.move_on_after(1.0):
                    await trio.lowlevel.wait_readable(self._replies_r)
                if _exited(self._spawner_pidfd):  # no EOF comes (see _make_sync)
                    self._free_slots.append(slot)
                    raise CloserError("the spawner is gone") from None
                continue
            if not got:
                self._free_slots.append(slot)
                raise CloserError("the spawner is gone")
            buf += got
        return self._answer(slot, buf)

    # -- the request path: a write at most, never a wait --------------------------

    @property
    def healthy(self) -> bool:
        return self.current is not None

    def give(self, fds: Iterable[int], whose: str) -> None:
        """Have ``fds`` closed.  They are the closers' from now on: the caller
        never touches these numbers again."""
        self.waiting.extend((fd, whose) for fd in fds)
        self._flush()

    def give_socket(self, sock: socket.socket, whose: str) -> None:
        """Have a client's connection closed.  It is shut down first, so the
        client sees the end at once, whenever the closer gets to it."""
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        self.give([sock.detach()], whose)

    def _flush(self) -> None:
        closer = self.current
        if closer is None or not self.waiting:
            if self.waiting:
                self._wake.set()
            return
        while self.waiting:
            batch = [self.waiting[i] for i in range(min(_BATCH, len(self.waiting)))]
            try:
                os.write(closer.commands_w, array.array("i", [fd for fd, _ in batch]).tobytes())
            except BlockingIOError:
                self._wake.set()  # the pipe is full: the loop waits for room
                return
            except OSError as exc:
                self.log.error("closer.write.failed", pid=closer.pid, error=str(exc))
                self._wake.set()
                return
            if self._finished(closer) >= closer.base + len(closer.sent):
                closer.progress_at = time.monotonic()  # it was idle: time it from now
            for _ in batch:
                closer.sent.append(self.waiting.popleft())

    # -- the watch ----------------------------------------------------------------

    def _finished(self, closer: _Closer) -> int:
        return int(self._counters[2 * closer.slot + 1])

    def _begun(self, closer: _Closer) -> int:
        return int(self._counters[2 * closer.slot])

    def check(self, now: float) -> _Closer | None:
        """Take note of the current closer's progress; the closer if it is stuck."""
        closer = self.current
        if closer is None:
            return None
        finished = self._finished(closer)
        if finished > closer.base:
            for _ in range(min(finished - closer.base, len(closer.sent))):
                closer.sent.popleft()
            closer.base = finished
            closer.progress_at = now
        if closer.sent and now - closer.progress_at > self.timeout:
            return closer
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch the closers until cancelled: find stuck ones, replace them,
        and hand over fds that waited."""
        task_status.started()
        while True:
            with trio.move_on_after(min(self.timeout / 4, 0.25)):
                await self._wake.wait()
            self._wake = trio.Event()
            self._reap()
            stuck = self.check(time.monotonic())
            if stuck is None and self.current is not None and _exited(self.current.pidfd):
                stuck = self.current  # killed by someone else: the same clean-up
            if stuck is not None:
                await self._abandon(stuck)
            if self.current is None:
                await self._replace()
            if self.waiting and self.current is not None:
                self._flush()
                if self.waiting:
                    with trio.move_on_after(self.timeout):
                        await trio.lowlevel.wait_writable(self.current.commands_w)

    async def _abandon(self, closer: _Closer) -> None:
        whose = closer.sent[0][1] if closer.sent else "?"
        seconds = round(time.monotonic() - closer.progress_at, 3)
        self.current = None
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(closer.pidfd, signal.SIGKILL)
        # Once SIGKILL is pending the closer runs no more of its own code; it
        # may still be on its way into the kernel for a moment, so its
        # counters are read once it has exited or has had time to stop.
        with trio.move_on_after(0.5):
            await trio.lowlevel.wait_readable(closer.pidfd)
        settled = settle(closer.sent, closer.base, self._begun(closer))
        for item in reversed(settled.retake):
            self.waiting.appendleft(item)
        for fd in (closer.commands_r, closer.commands_w):
            with contextlib.suppress(OSError):
                os.close(fd)  # pipe ends tapd made: closing them waits on nothing
        if settled.stuck:
            whose = settled.stuck[1]
        exited = _exited(closer.pidfd)
        if exited:
            self._release(closer)
        else:
            self.stuck.append((closer, whose))
        # One line for the admin: whose fd, and whether the closer is still
        # held (a FUSE flush: until its server answers or goes).
        self.log.warning(
            "closer.stuck",
            closer=closer.pid,
            seconds=seconds,
            owner=whose,
            killed=exited,
            retaken=len(settled.retake),
            stuck_closers=len(self.stuck),
        )

    def _reap(self) -> None:
        for closer, whose in list(self.stuck):
            if _exited(closer.pidfd):
                self.stuck.remove((closer, whose))
                self.log.info("closer.released", closer=closer.pid, owner=whose)
                self._release(closer)

    def _release(self, closer: _Closer) -> None:
        with contextlib.suppress(OSError):
            os.close(closer.pidfd)
        self._free_slots.append(closer.slot)

    async def _replace(self) -> None:
        if len(self.stuck) >= self.max_stuck or self._spawning:
            return
        if _exited(self._spawner_pidfd):
            if not self._spawner_gone:
                self._spawner_gone = True
                self.log.critical("closer.spawner.gone", spawner=self.spawner_pid)
            return
        self._spawning = True
        try:
            self.current = await self._make()
            self.log.info("closer.started", closer=self.current.pid, stuck=len(self.stuck))
        except CloserError as exc:
            self.log.error("closer.start.failed", error=str(exc))
        finally:
            self._spawning = False


def _exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _read_exactly(fd: int, size: int) -> bytes:
    buf = b""
    while len(buf) < size:
        got = os.read(fd, size - len(buf))
        if not got:
            raise CloserError("the spawner is gone")
        buf += got
    return buf
