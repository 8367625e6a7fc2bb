"""The shipped timer and service that write tapd's metrics for node_exporter's
textfile collector: valid units, confined, and a command that works."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from tapdtest import UNITS, Daemon, unit_directives

TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
TAPCTL = Path(sys.executable).parent / "tapctl"


def here(unit: str, tmp_path: Path) -> Path:
    """The unit with its ExecStart= pointing at this environment's tapctl
    (verify insists that the program exists)."""
    path = tmp_path / unit
    path.write_text((UNITS / unit).read_text().replace("/usr/local/bin/tapctl", str(TAPCTL)))
    return path


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze comes with systemd, installed by .ci/setup"
    assert TAPCTL.exists(), "tapctl is installed in the test environment"
    units = [here("tapd-metrics.service", tmp_path), here("tapd-metrics.timer", tmp_path)]
    result = subprocess.run([analyze, "verify", *map(str, units)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_the_writer_is_confined(tmp_path: Path) -> None:
    service = unit_directives("tapd-metrics.service")
    assert service["CapabilityBoundingSet"] == [""]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["ReadWritePaths"] == [TEXTFILE_DIR]
    assert service["ConditionPathIsDirectory"] == [TEXTFILE_DIR]
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            str(here("tapd-metrics.service", tmp_path)),
        ],
        capture_output=True,
        text=True,
    )
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert level, result.stdout + result.stderr
    assert float(level.group(1)) <= 2.0, result.stdout


def test_the_timer_runs_the_writer_again_and_again() -> None:
    timer = unit_directives("tapd-metrics.timer")
    assert timer["OnUnitActiveSec"] == ["30s"]
    assert timer["WantedBy"] == ["timers.target"]


def test_the_services_command_writes_a_textfile_node_exporter_can_read(
    daemon: Daemon, tmp_path: Path
) -> None:
    (exec_start,) = unit_directives("tapd-metrics.service")["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == "/usr/local/bin/tapctl"
    # As the unit runs it, against the test's tapd and into a directory of the test's.
    textfiles = tmp_path / "node-exporter"
    textfiles.mkdir()
    argv = [str(TAPCTL), *(a.replace(TEXTFILE_DIR, str(textfiles)) for a in argv[1:])]
    env = dict(os.environ, TAPD_SOCKET=daemon.socket_path)
    grant = daemon.request(br="br0")
    try:
        subprocess.run(argv, env=env, check=True, capture_output=True)
    finally:
        grant.close()
    (written,) = textfiles.glob("*.prom")  # what the collector reads, and nothing else
    assert stat.S_IMODE(written.stat().st_mode) == 0o644
    assert os.listdir(textfiles) == [written.name]
    leases = {
        sample.labels["bridge"]: sample.value
        for family in text_string_to_metric_families(written.read_text())
        for sample in family.samples
        if sample.name == "tapd_leases"
    }
    assert leases == {"br0": 1}
