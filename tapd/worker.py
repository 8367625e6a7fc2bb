"""One thread for the kernel calls that may take long.

pyroute2 keeps its event loop and sockets in thread-local storage, its calls
cost hundreds of microseconds of Python each and a dump grows with the host,
and the kernel serialises link changes under the RTNL lock anyway, so tapd
runs every pyroute2 call (bridge lookups, dumps, removals) and the adoption
of taps made elsewhere in a single long-lived thread.  The trio loop hands it
a callable and sleeps until the result is back; no thread is created per
request.  (A single-queue tap is a few quick syscalls and is made on the
loop while this thread is idle: see :mod:`tapd.making`.)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TypeVar, TypeVarTuple

import outcome
import trio

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_STOP = object()


class KernelWorker:
    def __init__(self, name: str = "tapd-kernel") -> None:
        self._jobs: queue.SimpleQueue[object] = queue.SimpleQueue()
        #: jobs handed over and not yet answered (changed on the trio side only)
        self.busy = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            job()  # type: ignore[operator]

    async def run(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """Run ``fn(*args)`` in the kernel thread and return its result.

        Not cancellable once submitted: a kernel call that made something
        (a tap, an fd) must hand it back to a caller that will clean it up.
        """
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[outcome.Outcome[T]] = []

        def job() -> None:
            result.append(outcome.capture(fn, *args))
            token.run_sync_soon(done.set)

        self.busy += 1
        try:
            self._jobs.put(job)
            with trio.CancelScope(shield=True):
                await done.wait()
        finally:
            self.busy -= 1
        return result[0].unwrap()

    def close(self) -> None:
        self._jobs.put(_STOP)
        self._thread.join(timeout=5)
