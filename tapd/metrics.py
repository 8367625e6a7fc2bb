"""tapd's numbers for a fleet: recorded in plain Python, rendered as
Prometheus text only when someone asks (the ``metrics`` op).

Recording sits on the request path, where a grant costs about 1.2 ms end to
end, so it is a few dict increments and one :func:`bisect.bisect_left`:
under a microsecond (``tests/bench/bench_metrics.py`` measures it).  The
exposition format is prometheus_client's, but importing it costs 15-40 ms,
so neither tapd's cold start nor a request pays for it: :func:`render`
imports it the first time a scrape needs it, off the trio loop, and feeds it
a :class:`Snapshot` through a custom collector.

Every label value comes from a bounded set - ops, outcomes, error codes, the
names of the configuration's rules, errno names, bridges that exist - never
from what a client wrote, so no client can grow the exposition without bound.
"""

from __future__ import annotations

import errno as errnos
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from . import __version__
from .errors import ClientError, Denied, KernelError, TapdError
from .leases import Lease
from .owner import Peer

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

#: upper bounds of the latency histogram's buckets, in seconds.  A grant is
#: ~1.2 ms and a 256-queue tap ~15 ms; helpers and scripts may take seconds,
#: up to their time limits.
BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def _errno_name(err: int | None) -> str:
    if err is None:
        return ""
    return errnos.errorcode.get(err, str(err))


class Recorder:
    """Counts what tapd answers.  Lives on the trio loop: no locks."""

    def __init__(self) -> None:
        #: (op, outcome, code, rule) -> replies
        self.requests: Counter[tuple[str, str, str, str]] = Counter()
        #: (op, outcome) -> [replies in each bucket (not cumulative)..., beyond the last]
        self.buckets: dict[tuple[str, str], list[int]] = {}
        #: (op, outcome) -> seconds, summed
        self.seconds: dict[tuple[str, str], float] = {}
        #: (error code, errno name) -> failed syscalls behind a reply
        self.kernel_errors: Counter[tuple[str, str]] = Counter()
        #: every bridge a scrape has seen with leases: it stays in the gauge
        #: at 0 rather than vanishing from graphs when its last lease ends
        self._bridges: set[str] = set()

    def request(
        self,
        op: str,
        started: float,
        *,
        error: BaseException | None = None,
        rule: str | None = None,
        granted: bool = False,
        delivered: bool = True,
    ) -> None:
        """One request answered.  ``started`` is :func:`time.perf_counter`
        when its line was complete; ``op`` is "" when the line never became a
        request.  ``rule`` is the allow rule of a grant; a refusal's rule
        comes with its error."""
        seconds = time.perf_counter() - started
        if error is None:
            outcome = ("granted" if granted else "ok") if delivered else "undelivered"
            code = ""
        else:
            outcome, code, rule = self._refusal(error)
        self.requests[op, outcome, code, rule or ""] += 1
        key = (op, outcome)
        counts = self.buckets.get(key)
        if counts is None:
            counts = self.buckets[key] = [0] * (len(BUCKETS) + 1)
        counts[bisect_left(BUCKETS, seconds)] += 1
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def refused(self, error: TapdError) -> None:
        """A connection refused before any request was read (overloaded, a
        line too long, too many fds, a timeout): counted, but not timed."""
        outcome, code, rule = self._refusal(error)
        self.requests["", outcome, code, rule] += 1

    def _refusal(self, error: BaseException) -> tuple[str, str, str]:
        """(outcome, code, rule) of an error reply, in the words of the
        request log: a policy denial is "denied", any other fault of the
        client "refused", the host's "failed"."""
        if not isinstance(error, TapdError):
            return "failed", "internal-error", ""
        if isinstance(error, KernelError):
            self.kernel_errors[error.code, _errno_name(error.errno)] += 1
        rule = str(error.context.get("rule", ""))
        if isinstance(error, Denied):
            return "denied", error.code, rule
        if isinstance(error, ClientError):
            return "refused", error.code, rule
        return "failed", error.code, rule

    def snapshot(
        self, leases: Iterable[Lease], connections: int, reconciled: Mapping[str, int]
    ) -> Snapshot:
        """A copy of every number, taken on the loop, to render elsewhere.
        ``reconciled`` is what starting tapd found on the host's tagged taps
        (restored: the owner alive; orphaned: the owner gone, the owner rule
        applied)."""
        per_bridge: Counter[str] = Counter(lease.bridge for lease in leases)
        self._bridges.update(per_bridge)
        return Snapshot(
            requests=dict(self.requests),
            durations={
                key: (tuple(counts), self.seconds[key]) for key, counts in self.buckets.items()
            },
            kernel_errors=dict(self.kernel_errors),
            reconciled={k: reconciled.get(k, 0) for k in ("restored", "orphaned")},
            leases={bridge: per_bridge[bridge] for bridge in self._bridges},
            connections=connections,
        )


@dataclass(frozen=True)
class Snapshot:
    requests: dict[tuple[str, str, str, str], int]
    durations: dict[tuple[str, str], tuple[tuple[int, ...], float]]
    kernel_errors: dict[tuple[str, str], int]
    reconciled: dict[str, int]
    leases: dict[str, int]
    connections: int


def _families(snap: Snapshot) -> Iterator[Metric]:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    info = GaugeMetricFamily("tapd_build_info", "tapd's version", labels=["version"])
    info.add_metric([__version__], 1)
    yield info
    requests = CounterMetricFamily(
        "tapd_requests",
        "Replies by op, outcome (granted, ok, denied, refused, failed, undelivered), "
        "error code and the policy rule that decided",
        labels=["op", "outcome", "code", "rule"],
    )
    for request, value in sorted(snap.requests.items()):
        requests.add_metric(request, value)
    yield requests
    latency = HistogramMetricFamily(
        "tapd_request_duration_seconds",
        "From a complete request line to its reply sent, by op and outcome",
        labels=["op", "outcome"],
    )
    for op_outcome, (counts, total) in sorted(snap.durations.items()):
        cumulative, buckets = 0, []
        for bound, count in zip((*map(repr, BUCKETS), "+Inf"), counts, strict=True):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        latency.add_metric(op_outcome, buckets, sum_value=total)
    yield latency
    kernel = CounterMetricFamily(
        "tapd_kernel_errors",
        "Requests that failed on a syscall, by error code and errno",
        labels=["code", "errno"],
    )
    for code_errno, value in sorted(snap.kernel_errors.items()):
        kernel.add_metric(code_errno, value)
    yield kernel
    leases = GaugeMetricFamily("tapd_leases", "Live leases, by bridge", labels=["bridge"])
    for bridge, value in sorted(snap.leases.items()):
        leases.add_metric([bridge], value)
    yield leases
    reconciled = CounterMetricFamily(
        "tapd_leases_reconciled",
        "Tagged taps found at start: leases restored (owner alive), or orphaned "
        "(owner gone: removed, kept while in use, or given back)",
        labels=["result"],
    )
    for result, value in snap.reconciled.items():
        reconciled.add_metric([result], value)
    yield reconciled
    yield GaugeMetricFamily("tapd_connections", "Open client connections", snap.connections)


def render(snap: Snapshot) -> str:
    """``snap`` in Prometheus's text exposition format (version 0.0.4, what
    node_exporter's textfile collector reads), with tapd's own process
    numbers (fds, memory, CPU) as ``tapd_process_*``: a textfile beside
    node_exporter's own ``process_*`` must not reuse its names."""
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
    from prometheus_client.registry import Collector

    class Numbers(Collector):
        def collect(self) -> Iterable[Metric]:
            return _families(snap)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Numbers())
    ProcessCollector(namespace="tapd", registry=registry)
    return generate_latest(registry).decode()


async def scrape(
    recorder: Recorder,
    peer: Peer,
    leases: Iterable[Lease],
    connections: int,
    reconciled: Mapping[str, int],
) -> str:
    """The exposition for the ``metrics`` op.

    Root only: the numbers count every uid's requests and leases (and the
    names of the rules that refused them), while ``list`` shows anyone else
    only their own.  A node_exporter textfile writer runs as root anyway.
    """
    if peer.uid != 0:
        raise Denied(
            "metrics count every user's requests and leases, so only root may read "
            "them; run tapctl metrics as root"
        )
    snap = recorder.snapshot(leases, connections, reconciled)
    # Off the loop: the first render imports prometheus_client (~40 ms).
    return await trio.to_thread.run_sync(render, snap)
