from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tapdtest import Daemon, ip, netns, run_daemon

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def _needs_root(request: pytest.FixtureRequest) -> None:
    """Kernel and QEMU tests need root.  Outside CI they are skipped without it;
    in CI (which is root) a missing privilege is a failure, never a skip."""
    marked = request.node.get_closest_marker("root") or request.node.get_closest_marker("e2e")
    if marked and (os.geteuid() != 0 or not os.path.exists("/dev/net/tun")):
        message = "needs root and /dev/net/tun"
        if IN_CI:
            pytest.fail(message + " (CI must provide both)")
        pytest.skip(message)


@pytest.fixture
def ns() -> Iterator[str]:
    with netns() as name:
        yield name


@pytest.fixture
def br0(ns: str) -> str:
    """A bridge with a non-default MTU, so copying it is visible."""
    ip("-n", ns, "link", "add", "br0", "mtu", "1400", "type", "bridge")
    ip("-n", ns, "link", "set", "br0", "up")
    return "br0"


@pytest.fixture
def daemon(ns: str, br0: str, tmp_path: Path) -> Iterator[Daemon]:
    with run_daemon(ns, tmp_path) as d:
        yield d
