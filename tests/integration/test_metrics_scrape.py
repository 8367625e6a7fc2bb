"""Metrics from a real tapd, read back through ``tapctl metrics`` as Prometheus
would read them: what was granted, refused and released, per rule and code,
leases per bridge, the latency histogram, kernel errors and a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tapdtest import Daemon, ip, links, run_daemon, wait_until

from tapd import client

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(daemon: Daemon) -> Samples:
    out = subprocess.run(
        [sys.executable, "-m", "tapd.tapctl", "--socket", daemon.socket_path, "metrics"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    samples: Samples = {}
    for family in text_string_to_metric_families(out):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def labels(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


def requests(samples: Samples, **kw: str) -> float:
    """tapd_requests_total for op/outcome/code/rule (code and rule default to none)."""
    kw.setdefault("code", "")
    kw.setdefault("rule", "")
    return samples["tapd_requests_total"].get(labels(**kw), 0)


POLICY = """
[[deny]]
users = ["0"]
bridges = ["br9"]

[[allow]]
users = ["0"]
bridges = ["br0", "br1", "gone"]
max_queues = 2
"""


def test_grants_refusals_a_release_leases_and_latency(ns: str, br0: str, tmp_path: Path) -> None:
    ip("-n", ns, "link", "add", "br1", "type", "bridge")
    ip("-n", ns, "link", "set", "br1", "up")
    with run_daemon(ns, tmp_path, POLICY) as daemon:
        held = [daemon.request(br=br0), daemon.request(br=br0, queues=2)]
        on_br1 = daemon.request(br="br1")
        held.append(on_br1)
        try:
            for options, code in [
                ({"br": "br9"}, "denied"),  # deny[0]
                ({"br": br0, "queues": 4}, "denied"),  # allow[0]'s max_queues
                ({"br": "br2"}, "denied"),  # no rule matches
                ({"br": "gone"}, "bridge-not-found"),  # allowed, but no such bridge
            ]:
                with pytest.raises(client.ClientError) as exc:
                    daemon.request(**options)
                assert exc.value.code == code
            (malformed,) = daemon.raw(b"not json\n")
            assert malformed["error"]["code"] == "malformed-json"
            (too_long,) = daemon.raw(b"x" * 70_000)  # refused before it is a line
            assert too_long["error"]["code"] == "line-too-long"
            leases = scrape(daemon)["tapd_leases"]
            assert leases == {labels(bridge="br0"): 2, labels(bridge="br1"): 1}
            client.release(on_br1.reply["lease"], path=daemon.socket_path)
            wait_until(lambda: len(daemon.leases()) == 2, what="the released lease to end")

            got = scrape(daemon)
            assert requests(got, op="request", outcome="granted", rule="allow[0]") == 3
            assert requests(got, op="request", outcome="denied", code="denied", rule="deny[0]") == 1
            assert (
                requests(got, op="request", outcome="denied", code="denied", rule="allow[0]") == 1
            )
            assert (
                requests(got, op="request", outcome="denied", code="denied", rule="no-match") == 1
            )
            assert requests(got, op="request", outcome="refused", code="bridge-not-found") == 1
            assert requests(got, op="", outcome="refused", code="malformed-json") == 1
            assert requests(got, op="", outcome="refused", code="line-too-long") == 1
            assert requests(got, op="release", outcome="ok") == 1
            assert got["tapd_leases"] == {labels(bridge="br0"): 2, labels(bridge="br1"): 0}
            assert got.get("tapd_kernel_errors_total", {}) == {}

            granted = labels(op="request", outcome="granted")
            assert got["tapd_request_duration_seconds_count"][granted] == 3
            assert got["tapd_request_duration_seconds_bucket"][(("le", "+Inf"), *granted)] == 3
            assert 0 < got["tapd_request_duration_seconds_sum"][granted] < 30
            denied = labels(op="request", outcome="denied")
            assert got["tapd_request_duration_seconds_count"][denied] == 3

            # Each scrape is counted, by the next one.
            assert requests(scrape(daemon), op="metrics", outcome="ok") == 2
        finally:
            for grant in held:
                grant.close()


def test_a_kernel_refusal_is_counted_with_its_errno(ns: str, br0: str, tmp_path: Path) -> None:
    # /dev/null opens, and refuses every tun ioctl with ENOTTY.
    with run_daemon(ns, tmp_path, '[taps]\ntun_device = "/dev/null"\n') as daemon:
        with pytest.raises(client.ClientError) as exc:
            daemon.request(br=br0)
        assert exc.value.code == "kernel-error"
        got = scrape(daemon)
        assert got["tapd_kernel_errors_total"] == {labels(code="kernel-error", errno="ENOTTY"): 1}
        assert requests(got, op="request", outcome="failed", code="kernel-error") == 1


#: holds a tap (made persistent if asked) until its stdin closes
HOLDER = """
import fcntl, sys
from tapd import client, tun
grant = client.request_tap(path=sys.argv[1], br="br0")
if sys.argv[2] == "persist":
    fcntl.ioctl(grant.tap_fds[0], tun.TUNSETPERSIST, 1)
print(grant.ifname, flush=True)
sys.stdin.read()
"""


def hold(socket_path: str, persist: bool = False) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, socket_path, "persist" if persist else "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def let_go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.wait(timeout=10)
    proc.stdout.close()


def test_a_restart_counts_the_leases_it_restored(ns: str, br0: str, tmp_path: Path) -> None:
    (tmp_path / "again").mkdir()
    with run_daemon(ns, tmp_path) as first:
        alive, alive_tap = hold(first.socket_path)
        dead, dead_tap = hold(first.socket_path, persist=True)
        first.stop(signal.SIGKILL)
    try:
        let_go(dead)  # its persistent tap outlives it, with no tapd to notice
        with run_daemon(ns, tmp_path / "again") as second:
            wait_until(lambda: dead_tap not in links(ns), what="the dead owner's tap to go")
            wait_until(lambda: len(second.leases()) == 1, what="one lease restored")
            got = scrape(second)
            assert got["tapd_leases_reconciled_total"] == {
                labels(result="restored"): 1,
                labels(result="orphaned"): 1,
            }
            assert got["tapd_leases"] == {labels(bridge=br0): 1}
            assert alive_tap in links(ns)
    finally:
        let_go(alive)


#: asks for metrics as nobody (the interpreter is loaded first: it may live
#: where nobody cannot read, as a pyenv under /root does)
AS_NOBODY = """
import os, sys
from tapd import client
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
try:
    client.call({"op": "metrics"}, path=sys.argv[1])
except client.ClientError as exc:
    print(exc.code)
"""


def test_metrics_are_for_root_only(daemon: Daemon) -> None:
    os.chmod(os.path.dirname(daemon.socket_path), 0o755)
    os.chmod(daemon.socket_path, 0o666)
    out = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, daemon.socket_path],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "denied", out.stderr
    assert requests(scrape(daemon), op="metrics", outcome="denied", code="denied") == 1
