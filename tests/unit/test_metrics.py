"""The metrics recorder and its rendering, read back with Prometheus's own parser.

The recorder's clock is replaced so that every duration is exact: a value on
a bucket's bound must land in that bucket (Prometheus's ``le`` is "at most").
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tapd import client, metrics, protocol, tapctl
from tapd.errors import (
    Denied,
    InvalidValue,
    KernelError,
    Overloaded,
    QuotaExceeded,
    UnknownKey,
    kernel_error,
)
from tapd.leases import Lease
from tapd.metrics import Recorder, render, scrape
from tapd.models import MetricsReply, MetricsRequest
from tapd.owner import Peer

ROOT = Peer(uid=0, gid=0, pid=1)


class Clock:
    """Stands in for time.perf_counter: requests take exactly what the test says."""

    def __init__(self) -> None:
        self.now = 0.0  # so that now - (now - s) is s exactly

    def perf_counter(self) -> float:
        return self.now

    def took(self, seconds: float) -> float:
        """A start time ``seconds`` before now."""
        return self.now - seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def lease(bridge: str, ifindex: int, uid: int = 0) -> Lease:
    return Lease(
        id=f"l{ifindex}",
        ifname=f"tap{ifindex}",
        ifindex=ifindex,
        bridge=bridge,
        queues=1,
        uid=uid,
        gid=uid,
        pid=1,
        starttime=1,
        created=0,
    )


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample: name -> {sorted labels: value}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def labels(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


def scraped(recorder: Recorder, leases: list[Lease] | None = None, **reconciled: int) -> Any:
    return parse(render(recorder.snapshot(leases or [], 3, reconciled)))


# -- counting ------------------------------------------------------------------------------


def test_grants_and_refusals_are_counted_by_op_outcome_code_and_rule(clock: Clock) -> None:
    r = Recorder()
    r.request("request", clock.took(0.001), rule="allow[0]", granted=True)
    r.request("request", clock.took(0.001), rule="allow[0]", granted=True)
    r.request("request", clock.took(0.001), rule="allow[1]", granted=True)
    r.request("request", clock.took(0.001), error=Denied("no").about(rule="deny[0]"))
    r.request("request", clock.took(0.001), error=QuotaExceeded("full").about(rule="allow[0]"))
    r.request("request", clock.took(0.001), error=Denied("nobody").about(rule="no-match"))
    r.request("", clock.took(0.001), error=UnknownKey("what"))
    r.request("request", clock.took(0.001), error=InvalidValue("queues"))
    r.request("list", clock.took(0.001))
    r.request("request", clock.took(0.001), error=RuntimeError("a bug"))
    r.request("request", clock.took(0.001), rule="allow[0]", delivered=False)
    r.refused(Overloaded("busy"))
    got = scraped(r)["tapd_requests_total"]
    assert got == {
        labels(op="request", outcome="granted", code="", rule="allow[0]"): 2,
        labels(op="request", outcome="granted", code="", rule="allow[1]"): 1,
        labels(op="request", outcome="denied", code="denied", rule="deny[0]"): 1,
        labels(op="request", outcome="denied", code="quota-exceeded", rule="allow[0]"): 1,
        labels(op="request", outcome="denied", code="denied", rule="no-match"): 1,
        labels(op="", outcome="refused", code="unknown-key", rule=""): 1,
        labels(op="request", outcome="refused", code="invalid-value", rule=""): 1,
        labels(op="list", outcome="ok", code="", rule=""): 1,
        labels(op="request", outcome="failed", code="internal-error", rule=""): 1,
        labels(op="request", outcome="undelivered", code="", rule="allow[0]"): 1,
        labels(op="", outcome="failed", code="overloaded", rule=""): 1,
    }


def test_kernel_errors_are_counted_by_code_and_errno(clock: Clock) -> None:
    r = Recorder()
    for err in (errno.EXFULL, errno.EXFULL, errno.EPERM, errno.EIO):
        r.request("request", clock.took(0.001), error=kernel_error(OSError(err, "x"), "doing"))
    r.request("request", clock.took(0.001), error=KernelError("no free name"))
    r.request("request", clock.took(0.001), error=InvalidValue("not the kernel"))
    got = scraped(r)
    assert got["tapd_kernel_errors_total"] == {
        labels(code="bridge-full", errno="EXFULL"): 2,
        labels(code="kernel-permission-denied", errno="EPERM"): 1,
        labels(code="kernel-error", errno="EIO"): 1,
        labels(code="kernel-error", errno=""): 1,
    }
    assert (
        got["tapd_requests_total"][
            labels(op="request", outcome="failed", code="bridge-full", rule="")
        ]
        == 2
    )


# -- the latency histogram -----------------------------------------------------------------


def test_latency_lands_in_cumulative_buckets_bounds_included(clock: Clock) -> None:
    r = Recorder()
    for seconds in (0.0012, 0.001, 0.0005, 0.02, 45.0):
        r.request("request", clock.took(seconds), rule="allow[0]", granted=True)
    r.request("request", clock.took(0.0001), error=Denied("no"))
    got = scraped(r)
    granted = dict(op="request", outcome="granted")
    buckets = {
        le: got["tapd_request_duration_seconds_bucket"][labels(le=le, **granted)]
        for le in ("0.00025", "0.0005", "0.001", "0.002", "0.02", "30.0", "+Inf")
    }
    assert buckets == {
        "0.00025": 0,
        "0.0005": 1,  # 0.0005 is "at most 0.0005"
        "0.001": 2,
        "0.002": 3,
        "0.02": 4,
        "30.0": 4,
        "+Inf": 5,
    }
    assert got["tapd_request_duration_seconds_count"][labels(**granted)] == 5
    assert got["tapd_request_duration_seconds_sum"][labels(**granted)] == pytest.approx(45.0227)
    denied = labels(op="request", outcome="denied")
    assert got["tapd_request_duration_seconds_count"][denied] == 1
    assert got["tapd_request_duration_seconds_bucket"][(("le", "0.0001"), *denied)] == 1


def test_every_bucket_is_rendered_in_order(clock: Clock) -> None:
    r = Recorder()
    r.request("hello", clock.took(0.0003))
    (family,) = (
        f
        for f in text_string_to_metric_families(render(r.snapshot([], 0, {})))
        if f.name == "tapd_request_duration_seconds"
    )
    bounds = [s.labels["le"] for s in family.samples if s.name.endswith("_bucket")]
    assert bounds == [repr(b) for b in metrics.BUCKETS] + ["+Inf"]
    counts = [s.value for s in family.samples if s.name.endswith("_bucket")]
    assert counts == sorted(counts) and counts[-1] == 1


# -- leases, restarts, the rest ------------------------------------------------------------


def test_live_leases_per_bridge_and_a_bridge_stays_at_zero() -> None:
    r = Recorder()
    got = scraped(r, [lease("br0", 1), lease("br0", 2, uid=1000), lease("br1", 3)])
    assert got["tapd_leases"] == {labels(bridge="br0"): 2, labels(bridge="br1"): 1}
    # br1's last lease ended: it stays, at 0, so its graph does not just stop.
    got = scraped(r, [lease("br0", 1)])
    assert got["tapd_leases"] == {labels(bridge="br0"): 1, labels(bridge="br1"): 0}


def test_leases_reconciled_at_start_and_connections() -> None:
    got = scraped(Recorder(), restored=4, orphaned=1)
    assert got["tapd_leases_reconciled_total"] == {
        labels(result="restored"): 4,
        labels(result="orphaned"): 1,
    }
    assert got["tapd_connections"] == {(): 3}
    assert list(got["tapd_build_info"].values()) == [1]


def test_tapds_own_process_numbers_do_not_take_node_exporters_names() -> None:
    got = scraped(Recorder())
    assert got["tapd_process_open_fds"][()] > 0
    assert not [name for name in got if name.startswith("process_")]


def test_label_values_are_escaped_and_read_back() -> None:
    odd = 'b"r\\0'  # a bridge name may hold quotes and backslashes
    got = scraped(Recorder(), [lease(odd, 1)])
    assert got["tapd_leases"] == {labels(bridge=odd): 1}


def test_an_empty_recorder_renders_valid_text() -> None:
    got = scraped(Recorder())
    assert "tapd_requests_total" not in got  # no samples yet, but a valid exposition
    assert got["tapd_leases_reconciled_total"][labels(result="restored")] == 0


# -- the op --------------------------------------------------------------------------------


def test_metrics_is_an_op_with_no_other_keys() -> None:
    assert protocol.decode_request(b'{"op": "metrics"}') == MetricsRequest(op="metrics")
    with pytest.raises(UnknownKey):
        protocol.decode_request(b'{"op": "metrics", "format": "openmetrics"}')
    line = protocol.encode(MetricsReply(text="a 1\n"))
    assert protocol.decode_reply(line) == {"ok": True, "text": "a 1\n"}


async def test_only_root_may_scrape() -> None:
    r = Recorder()
    with pytest.raises(Denied, match="only root"):
        await scrape(r, Peer(uid=1000, gid=1000, pid=1), [lease("br0", 1)], 0, {})
    text = await scrape(r, ROOT, [lease("br0", 1)], 0, {})
    assert parse(text)["tapd_leases"] == {labels(bridge="br0"): 1}


# -- what nobody pays for ------------------------------------------------------------------


def _imported_after(code: str) -> bool:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('prometheus_client' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip() == "True"


def test_neither_the_daemons_start_nor_tapctl_imports_prometheus_client() -> None:
    assert not _imported_after("import tapd.daemon, tapd.server, tapd.service, tapd.metrics")
    assert not _imported_after("import tapd.tapctl")
    # ... until a scrape renders.
    assert _imported_after(
        "from tapd import metrics; metrics.render(metrics.Recorder().snapshot([], 0, {}))"
    )


# -- tapctl metrics ------------------------------------------------------------------------


@pytest.fixture
def reply(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """tapctl's calls, answered with a canned exposition."""
    calls: list[dict[str, Any]] = []

    def call(request: dict[str, Any], **kw: Any) -> tuple[dict[str, Any], list[int]]:
        calls.append(request)
        return {"ok": True, "text": "tapd_connections 1.0\n"}, []

    monkeypatch.setattr(client, "call", call)
    yield calls


def test_tapctl_metrics_prints_the_text(
    reply: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert tapctl.main(["metrics"]) == 0
    assert capsys.readouterr().out == "tapd_connections 1.0\n"
    assert reply == [{"op": "metrics"}]


def test_tapctl_metrics_output_replaces_the_file_whole(
    reply: list[dict[str, Any]], tmp_path: Path
) -> None:
    target = tmp_path / "tapd.prom"
    target.write_text("old\n")
    os.chmod(target, 0o600)
    assert tapctl.main(["metrics", "--output", str(target)]) == 0
    assert target.read_text() == "tapd_connections 1.0\n"
    # node_exporter runs as its own user and must be able to read it.
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["tapd.prom"]  # no temporary file left


def test_tapctl_metrics_output_that_cannot_be_written_is_one_line(
    reply: list[dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tapctl.main(["metrics", "--output", str(tmp_path / "no" / "tapd.prom")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tapctl: cannot write ") and err.endswith("[output-failed]\n")
    assert len(err.splitlines()) == 1
    # Nor is a temporary file left when the rename fails (the target is a directory).
    (tmp_path / "dir.prom").mkdir()
    assert tapctl.main(["metrics", "--output", str(tmp_path / "dir.prom")]) == 1
    assert sorted(os.listdir(tmp_path)) == ["dir.prom"]
